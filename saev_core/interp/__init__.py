"""Interpretability and reports: feature dashboards, sample explanations, offline HTML rendering."""
