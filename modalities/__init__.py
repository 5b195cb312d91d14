"""Backbone adapters per modality, and what they share."""
