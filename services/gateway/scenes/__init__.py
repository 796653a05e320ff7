"""Scenes: a posed person put into a photo of a place, from a catalog of actions and places."""
