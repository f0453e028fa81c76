"""The call contract: argument checks, the float64 reference, and patterns (the mask language).

Imports nothing else from attnlab.
"""
