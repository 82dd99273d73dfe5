"""Text that reaches a model, a terminal or the ledger: printable, bounded, and on one line where it must be.

Everything the harness shows passes through here, so what "safe to show" means is decided once.
(sandbox/ decodes a container's raw bytes with its own `safe_text`: it sits below the harness.)
"""

from __future__ import annotations

# What may not reach a model or a terminal: C0 controls but newline and tab, DEL and the C1 range (U+009B is
# a one-character CSI to some terminals), and lone surrogates (a file name with invalid UTF-8 bytes arrives
# as surrogate escapes; they cannot even be encoded). Each becomes U+FFFD, as invalid bytes do when decoded.
_UNPRINTABLE = {code: "\ufffd" for code in [*range(0x20), *range(0x7F, 0xA0), *range(0xD800, 0xE000)]
                if chr(code) not in "\n\t"}


def printable(text: str) -> str:
    """`text` safe to show to a model or print on a terminal: only newline and tab of the control characters."""
    return text.translate(_UNPRINTABLE)


def clip(text: str, limit: int, joiner: str = "\n") -> str:
    """At most about `limit` characters: the head and the tail, with how much was cut between them."""
    if len(text) <= limit:
        return text
    half = max(limit // 2 - 20, 1)
    return f"{text[:half]}{joiner}[... {len(text) - 2 * half} characters cut ...]{joiner}{text[-half:]}"


def one_line(text: object, limit: int, fold: bool = False) -> str:
    """Printable and on one line, head and tail kept within about `limit` characters. Newlines and tabs are
    escaped (a value quoted exactly), or with `fold` every run of whitespace becomes one space (prose)."""
    text = printable(str(text))
    flat = " ".join(text.split()) if fold else text.replace("\n", "\\n").replace("\t", "\\t")
    return clip(flat, limit, joiner=" ")


def last_lines(text: str, lines: int, chars: int) -> str:
    """The end of a log: its last `lines` lines, at most `chars` characters."""
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]
