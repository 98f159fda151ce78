"""Small item-level utilities."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Compose, Transform

__all__ = ["CheckedCompose", "ReplaceNoned"]


class ReplaceNoned(Transform):
    """Replace ``None`` values of top-level item fields by ``value`` so MONAI/PyTorch collation works.

    Datalist items may hold JSON ``null`` (e.g. ``divergence_kind`` of a consistent tile), which
    ``default_collate`` rejects.

    Args:
        value: replacement (default ``"none"``).
    """

    def __init__(self, value: Any = "none") -> None:
        self.value = value

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace the ``None`` fields.

        Args:
            data: item dict.

        Returns:
            A new dict.
        """
        return {k: (self.value if v is None else v) for k, v in data.items()}


class CheckedCompose(Compose):
    """``Compose`` that re-raises the original input error instead of MONAI's generic wrapper.

    MONAI wraps any exception raised inside a transform in ``RuntimeError("applying transform ...")``; for bad
    input the useful message (which file, which key, what was expected) is the wrapped ``ValueError`` /
    ``FileNotFoundError``, so that one is raised (its traceback keeps the chain). Data statistics logging on
    error is off by default.

    Args:
        transforms: the transforms.
        kwargs: other ``Compose`` arguments.
    """

    def __init__(self, transforms: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("log_stats", False)
        super().__init__(transforms, **kwargs)

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        """Apply the transforms; surface the first ``ValueError``/``FileNotFoundError``/``KeyError`` cause.

        Args:
            input_: item.
            args: passed to ``Compose.__call__``.
            kwargs: passed to ``Compose.__call__``.

        Returns:
            The transformed item(s).

        Raises:
            ValueError, FileNotFoundError, KeyError: bad input, as raised by the failing transform.
        """
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause: BaseException | None = err
            while cause is not None:
                if isinstance(cause, (ValueError, FileNotFoundError, KeyError)):
                    raise cause from err
                cause = cause.__cause__
            raise
