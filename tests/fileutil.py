"""Small file helpers shared by the tests."""

import hashlib
import os


def tree_digest(root) -> dict:
    """Every file and directory under ``root``: relative path -> sha256 of its bytes ('dir' for dirs)."""
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            digest[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest
