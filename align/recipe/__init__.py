"""Recipes: YAML with locations (`loader`), overrides, typed schemas, errors, whole-recipe validation."""
