"""Type aliases used across haqjax."""

from typing import Any

import jax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
PRNGKey = jax.Array
PyTree = Any
Shape = tuple[int, ...]
