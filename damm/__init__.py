"""damm package."""
