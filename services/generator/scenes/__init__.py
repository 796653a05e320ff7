"""Putting a posed person into a place's photo: the image work of a scene job.

What is here is plain Pillow so it can be tested without models and reasoned about in pixels:
where the figure goes in the background, and which pixels the inpainting may repaint.
"""
