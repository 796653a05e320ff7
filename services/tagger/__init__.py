"""Captioning (BLIP) and tagging (WD14) of images, for building LoRA training datasets.

``models`` holds the model code, ``tiny`` builds random-weight stand-ins in the real models'
layouts; the rules that turn their output into training text live in ``text``.
"""
