"""Placeholder: family under construction."""
