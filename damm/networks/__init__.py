"""damm/networks package."""
