"""Applications built on the library: the ``earlyexit`` command line (demo, calibrate, kernel-demo, env),
the SmolLM2 loader they share. Nothing in the library imports them.
"""
