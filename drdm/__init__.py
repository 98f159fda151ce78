"""drdm package."""
