"""Molecule strings as token sequences: a SMILES (or SELFIES) tokenizer and the vocabulary that maps tokens
to ids. The vocabulary is saved beside the checkpoint (vocab.json in the run directory) so a restored
model decodes its samples with the ids it was trained with.

Ids: 0 = padding (after the end; not scored), 1 = start (fed to the decoder before the first token),
2 = end, then the data's tokens in order of first appearance in the sorted token set.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")

# One token per atom, bond, branch or ring-closure digit (Schwaller et al. 2019's SMILES regex): bracket
# atoms such as [nH] stay whole, Cl and Br are one token, %12 is one two-digit ring closure.
SMILES_TOKEN = re.compile(r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])")


class TokenizeError(ValueError):
  """A string has characters the tokenizer does not cover, or a token the vocabulary lacks."""


def tokenize_smiles(smiles: str) -> list[str]:
  tokens = SMILES_TOKEN.findall(smiles)
  if "".join(tokens) != smiles:
    raise TokenizeError(f"SMILES {smiles!r} has characters outside the SMILES alphabet")
  return tokens


def tokenize_selfies(selfies: str) -> list[str]:
  import selfies as sf  # optional: the [molecules] extra
  return list(sf.split_selfies(selfies))


def to_selfies(smiles: str) -> str:
  import selfies as sf
  return sf.encoder(smiles)


def selfies_to_smiles(selfies: str) -> str:
  import selfies as sf
  return sf.decoder(selfies)


TOKENIZERS = {"smiles": tokenize_smiles, "selfies": tokenize_selfies}


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  tokens: tuple[str, ...]  # id -> token; the first three are SPECIALS
  length: int              # sequence slots per molecule: the longest training string's tokens + the end token
  syntax: str = "smiles"   # smiles | selfies

  @classmethod
  def build(cls, token_lists: Iterable[Sequence[str]], syntax: str) -> "Vocabulary":
    token_lists = list(token_lists)
    symbols = sorted({t for tokens in token_lists for t in tokens})
    if len(SPECIALS) + len(symbols) > 256:
      raise TokenizeError(f"{len(symbols)} distinct tokens do not fit uint8 ids (at most 253)")
    return cls(SPECIALS + tuple(symbols), max(map(len, token_lists)) + 1, syntax)

  @property
  def size(self) -> int:
    return len(self.tokens)

  def encode(self, token_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """[N, length] uint8: the ids, the end token, then padding. Raises on a sequence too long or an unknown token."""
    index = {t: i for i, t in enumerate(self.tokens)}
    out = np.full((len(token_lists), self.length), PAD, np.uint8)
    for row, tokens in enumerate(token_lists):
      if len(tokens) + 1 > self.length:
        raise TokenizeError(f"a sequence of {len(tokens)} tokens does not fit {self.length} slots (with the end)")
      try:
        out[row, :len(tokens)] = [index[t] for t in tokens]
      except KeyError as e:
        raise TokenizeError(f"token {e.args[0]!r} is not in the vocabulary") from None
      out[row, len(tokens)] = EOS
    return out

  def decode(self, ids: np.ndarray) -> list[str]:
    """[N, T] ids -> strings: the tokens up to the first end (or padding) token; start tokens are dropped."""
    strings = []
    for row in np.asarray(ids):
      stop = np.flatnonzero((row == EOS) | (row == PAD))
      row = row[: stop[0] if stop.size else len(row)]
      strings.append("".join(self.tokens[i] for i in row if i >= len(SPECIALS)))
    return strings

  def to_smiles(self, strings: Sequence[str]) -> list[str]:
    """Decoded strings as SMILES (SELFIES are translated; a SELFIES string always gives a molecule)."""
    return list(strings) if self.syntax == "smiles" else [selfies_to_smiles(s) for s in strings]

  def save(self, path: Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

  @classmethod
  def load(cls, path: Path) -> "Vocabulary":
    d = json.loads(Path(path).read_text())
    return cls(tuple(d["tokens"]), int(d["length"]), d.get("syntax", "smiles"))
