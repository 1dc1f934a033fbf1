"""Nested-dict helpers for model variables (`params`, `batch_stats`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from haqjax.typing import PyTree


def get_path(tree: PyTree, path: Sequence[str]) -> PyTree:
  """The subtree of nested dicts at `path` (a module path)."""
  for key in path:
    tree = tree[key]
  return tree


def copy_tree(tree: PyTree) -> PyTree:
  """Nested plain dicts copied (leaves shared), safe to update in place."""
  if isinstance(tree, Mapping):
    return {k: copy_tree(v) for k, v in tree.items()}
  return tree
