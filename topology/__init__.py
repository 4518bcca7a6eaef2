"""Orbital geometry and the emulated network it drives.

Geometry (`orbits`, `links`, `routing`) is pure computation on arrays and
needs no privileges; the emulation substrate (`netns`, `shaping`,
`delayline`, `emulator`) turns its results into kernel objects.
"""
