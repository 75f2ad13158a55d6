"""The simulated engine's vocabulary: token ids of the model's tokenizer whose text is known in advance.

A real engine detokenizes incrementally: each token's text is what it adds to the decoded sequence.
Doing that per token would cost the simulator more CPU than the rest of a worker, so it generates
only from a pool of plain tokens (ASCII letters, with or without one leading space; never special
or added tokens) that decode the same alone as after another token. For such tokens the decoded
text of any sequence is the concatenation of their texts, so a table lookup gives exact deltas;
:func:`build_pool` checks that on a sample sequence and refuses a tokenizer for which it fails.

Text the simulator must say exactly (a JSON document, tool-call or reasoning markup) is encoded
with the tokenizer and its tokens' texts found once, when a request is planned (:class:`Detokenizer`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

POOL_SIZE = 512
_PLAIN = re.compile(r" ?[A-Za-z]+")
_SCAN_LIMIT = 20_000
"""Vocabulary ids tried at most: enough for a full pool from any real tokenizer, and quick."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the simulator uses."""

    eos_token_id: int | None
    all_special_ids: list[int]

    def __len__(self) -> int: ...
    def get_added_vocab(self) -> dict[str, int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: Any) -> str: ...
    def batch_decode(
        self, sequences: list[list[int]], skip_special_tokens: bool = ..., **kwargs: Any
    ) -> list[str]: ...
    def encode(self, text: str, add_special_tokens: bool = ..., **kwargs: Any) -> list[int]: ...


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a model directory or Hugging Face id.

    A directory with a ``tokenizer.json`` (the demo model's, and most others) is read with the
    ``tokenizers`` library alone, in milliseconds; anything else goes through ``transformers``,
    whose import alone takes seconds. For the plain tokens the simulator emits both decode alike.
    """
    local = Path(path).expanduser()
    if (local / "tokenizer.json").is_file():
        return FastTokenizer(local)
    from transformers import AutoTokenizer

    tokenizer: Tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else path)  # type: ignore[assignment]
    return tokenizer


class FastTokenizer:
    """:class:`Tokenizer` on a ``tokenizer.json`` and the EOS named in ``tokenizer_config.json``."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_file(str(directory / "tokenizer.json"))
        added = self._tok.get_added_tokens_decoder()
        self._added = {token.content: i for i, token in added.items()}
        self.all_special_ids = [i for i, token in added.items() if token.special]
        config = directory / "tokenizer_config.json"
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        if isinstance(eos, dict):  # older configs spell an AddedToken out
            eos = eos.get("content")
        self.eos_token_id: int | None = self._tok.token_to_id(eos) if isinstance(eos, str) else None

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self._added)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def batch_decode(
        self, sequences: list[list[int]], skip_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        return list(self._tok.decode_batch(sequences, skip_special_tokens=skip_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)


class UnsuitableTokenizer(ValueError):
    """The tokenizer has too few tokens that detokenize one by one."""


@dataclass(frozen=True, slots=True)
class TokenPool:
    ids: tuple[int, ...]
    texts: tuple[str, ...]
    """The text each of ``ids`` adds to any sequence of pool tokens."""
    eos_token_id: int | None
    vocab_size: int

    def without(self, excluded: Iterable[int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The pool less some ids (a request's stop token ids, which only end a choice)."""
        drop = set(excluded)
        kept = [(i, t) for i, t in zip(self.ids, self.texts, strict=True) if i not in drop]
        return tuple(i for i, _ in kept), tuple(t for _, t in kept)


def build_pool(tokenizer: Tokenizer, size: int = POOL_SIZE, seed: int = 0) -> TokenPool:
    """Up to ``size`` plain tokens, picked in a fixed pseudo-random order of the vocabulary."""
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    order = list(range(vocab))
    random.Random(seed).shuffle(order)
    candidates = [
        (i, text)
        for i in order[:_SCAN_LIMIT]
        if i not in special and _PLAIN.fullmatch(text := tokenizer.decode([i]))
    ]
    # Neighbours to test candidates against: tokens that at least repeat cleanly.
    anchors = [i for i, text in candidates if tokenizer.decode([i, i]) == text + text][:2]
    ids: list[int] = []
    texts: list[str] = []
    for i, text in candidates:
        if len(ids) == size:
            break
        if all(_adds(tokenizer, a, i, text) for a in anchors):
            ids.append(i)
            texts.append(text)
    if len(ids) < 2:
        raise UnsuitableTokenizer(f"only {len(ids)} tokens of the vocabulary decode one by one")
    _check_concatenation(tokenizer, ids, texts)
    return TokenPool(tuple(ids), tuple(texts), tokenizer.eos_token_id, vocab)


def _adds(tokenizer: Tokenizer, anchor: int, token: int, text: str) -> bool:
    """Does ``token`` add ``text`` after ``anchor``, and leave ``anchor``'s text alone before it?"""
    before = tokenizer.decode([anchor])
    return (
        tokenizer.decode([anchor, token]) == before + text
        and tokenizer.decode([token, anchor]) == text + before
    )


def _check_concatenation(tokenizer: Tokenizer, ids: list[int], texts: list[str]) -> None:
    rng = random.Random(1)
    sample = [rng.randrange(len(ids)) for _ in range(256)]
    decoded = tokenizer.decode([ids[k] for k in sample])
    if decoded != "".join(texts[k] for k in sample):
        raise UnsuitableTokenizer("a sequence of plain tokens does not decode to the sum of their texts")


CONTEXT_TOKENS = 5
"""Tokens before a new one that its text is decoded with (vLLM's incremental detokenizer uses as many)."""


class Detokenizer:
    """Token texts for one tokenizer; what each token decodes to on its own is remembered (a few
    thousand entries at most: the tokens that requests' scripts use)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._alone: dict[bool, dict[int, str]] = {True: {}, False: {}}

    def alone(self, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
        """Each token decoded on its own."""
        known = self._alone[skip_special_tokens]
        missing = list({i for i in ids if i not in known})
        if missing:
            decoded = self._tok.batch_decode([[i] for i in missing], skip_special_tokens=skip_special_tokens)
            known.update(zip(missing, decoded, strict=True))
        return [known[i] for i in ids]

    def texts(
        self, ids: list[int], context: list[int], skip_special_tokens: bool = True
    ) -> tuple[list[str], list[str]]:
        """The text each of ``ids`` adds after ``context`` (what a detokenizing engine streams; ""
        for a token that ends inside a character), and each decoded on its own (what log
        probabilities show).

        Most tokenizers decode a sequence to the concatenation of its tokens decoded alone, which
        one decode shows; with the others (a SentencePiece word after another, a character split
        across tokens) each token is decoded with a few before it, as vLLM does.
        """
        alone = self.alone(ids, skip_special_tokens)
        tail = context[-CONTEXT_TOKENS:]
        before = self._tok.decode(tail, skip_special_tokens=skip_special_tokens)
        whole = self._tok.decode([*tail, *ids], skip_special_tokens=skip_special_tokens)
        joined = "".join(alone)
        if whole == before + joined and "\ufffd" not in joined:
            return alone, alone
        return _incremental(self._tok, [*tail, *ids], len(tail), skip_special_tokens), alone


def _incremental(tokenizer: Tokenizer, tokens: list[int], start: int, skip: bool) -> list[str]:
    """vLLM's incremental detokenization of ``tokens[start:]``: a token's text is what decoding from a
    few tokens back adds, once it no longer ends in a partial character."""
    texts: list[str] = []
    prefix, read = max(0, start - CONTEXT_TOKENS), start
    for end in range(start + 1, len(tokens) + 1):
        known = tokenizer.decode(tokens[prefix:read], skip_special_tokens=skip)
        grown = tokenizer.decode(tokens[prefix:end], skip_special_tokens=skip)
        if len(grown) > len(known) and not grown.endswith("\ufffd"):
            texts.append(grown[len(known) :])
            prefix, read = read, end
        else:
            texts.append("")
    return texts
