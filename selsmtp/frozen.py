"""Small immutable value classes, written by hand instead of as frozen dataclasses.

Why: ``@dataclass`` builds each class's methods from source text with ``exec`` at
import, and importing ``dataclasses`` pulls in ``inspect``; for selsmtp's seven value
classes that was about 9 ms of the 50 from process start to the first greeting
(measured, with bytecode cached). A subclass of :class:`Frozen` lists its fields in
``__slots__`` and ``__match_args__`` and writes its ``__init__`` with
:func:`init_field`; it gets the rest of what ``@dataclass(frozen=True, slots=True)``
gave: equality and hashing by its fields, a repr, copying and pickling, and an
``AttributeError`` on assignment.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import ClassVar, NoReturn

#: Set a field of a new instance (``Frozen.__setattr__`` refuses to).
init_field = object.__setattr__


class Frozen:
    """Base of a value class: compared, hashed, shown and pickled by its fields.

    ``__match_args__`` names the fields in the order ``__init__`` takes them (as a
    dataclass's does); fields not listed there (derived ones) take no part.
    """

    __slots__ = ()
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self.__match_args__])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Frozen) and other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{self.__class__.__qualname__}({fields})"

    def __reduce__(self) -> tuple[type[Frozen], tuple[object, ...]]:
        return self.__class__, self._values()

    # Why ``value: NoReturn``: mypy then refuses assignments to names that are not
    # fields (it cannot be told that fields are read-only).
    def __setattr__(self, name: str, value: NoReturn) -> NoReturn:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"cannot delete field {name!r}")
