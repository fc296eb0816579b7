"""Helpers of the test suite (not tests): real UML guests (``uml``), ext4 workloads in them (``fslab``),
NBD servers and clients (``nbdlab``), the bad-input corpus (``bad_corpus``); for the filesystem reader,
ext2/3/4 images of every layout and the kernel's view of them (``fstree``) and jbd2 journals (``jbd2lab``);
for ``changes``, guests that change a model and the kernel's view of the difference (``changeslab``);
for ``mount``, FUSE mounts made and taken down, small images (``fuselab``).

Tests import them as ``from support import fslab`` or ``from support.uml import ubd_arg``: pytest puts
tests/ on sys.path (it has no __init__.py), so ``support`` is this package.
"""
