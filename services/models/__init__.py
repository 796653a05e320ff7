"""Model plumbing every worker shares: sources, weight hashes, devices, built-in tiny models.

The generator, the trainer and the tagger each import from here and never from one another,
so a worker image carries only its own service's code and the model cache behaves the same
for all three.
"""
