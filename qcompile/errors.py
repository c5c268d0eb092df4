"""The one error type users see.

Everything qcompile refuses to do is a `QCompileError` that names the file, node or
tensor involved and says what to do. Any other exception escaping qcompile is a bug.
"""

from __future__ import annotations


class QCompileError(Exception):
    """A user-facing error: bad input, unsupported model, impossible request."""

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        tensor: str | None = None,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.node = node
        self.tensor = tensor
        self.path = path
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(f"file '{self.path}'")
        if self.node:
            where.append(f"node '{self.node}'")
        if self.tensor:
            where.append(f"tensor '{self.tensor}'")
        text = self.message
        if where:
            text = f"{text} [{', '.join(where)}]"
        if self.hint:
            text = f"{text}\n  hint: {self.hint}"
        return text


def find_qcompile_error(exc: BaseException | None) -> QCompileError | None:
    """Follow `__cause__`/`__context__` (e.g. through onnx-ir's PassError) to a QCompileError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, QCompileError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
