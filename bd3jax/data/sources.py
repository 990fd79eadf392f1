"""Text corpora: local .txt / .jsonl files, the bundled demo corpus, a held-out split."""

import glob
import importlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
from absl import logging

_BLANK_LINES = re.compile(r"\n\s*\n")
_REPLACEMENT = "\ufffd"

# Pure-Python standard-library modules whose docstrings make up the demo corpus. `inspect` is
# left out: some libraries (torch) replace its functions when imported, which would change
# the corpus within one process.
_DEMO_MODULES = (
    "abc argparse ast asyncio base64 bdb bisect calendar cmd code codecs collections "
    "collections.abc compileall concurrent.futures configparser contextlib copy csv "
    "dataclasses datetime decimal difflib dis doctest email enum filecmp fileinput fnmatch "
    "fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html "
    "html.parser http.client http.server imaplib io ipaddress itertools json locale "
    "logging logging.handlers mailbox mimetypes multiprocessing netrc numbers operator "
    "optparse os pathlib pdb pickle pkgutil platform plistlib poplib pprint pydoc queue "
    "quopri random re reprlib runpy sched secrets selectors shlex shutil smtplib socket "
    "socketserver stat statistics string struct subprocess symtable sysconfig tabnanny "
    "tarfile tempfile textwrap threading timeit tokenize trace traceback types typing "
    "unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client xmlrpc.server zipapp "
    "zipfile zoneinfo").split()


def _expand(patterns: str) -> list[str]:
  """Sorted files matched by comma-separated globs; every glob must match a file."""
  globs = [p.strip() for p in patterns.split(",") if p.strip()]
  if not globs:
    raise ValueError("no data files given: set config.data.train_files to comma-separated "
                     "globs of .txt / .jsonl files")
  paths = set()
  for pattern in globs:
    matched = glob.glob(os.path.expanduser(pattern), recursive=True)
    if not matched:
      raise FileNotFoundError(f"{pattern!r} matches no file; fix the path in config.data")
    paths.update(matched)
  for path in paths:
    if os.path.isdir(path):
      raise ValueError(f"{path!r} is a directory; give a glob of files such as '{path}/*.txt'")
    if not path.endswith((".txt", ".jsonl")):
      raise ValueError(f"{path!r}: unsupported file type; use .txt or .jsonl files")
  return sorted(paths)


def _read_text(path: str) -> tuple[str, int]:
  """UTF-8 text of `path` with invalid bytes replaced, and how many replacements were made."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ValueError(f"cannot read {path!r} ({e.strerror}); check that it exists and is readable") from None
  text = raw.decode("utf-8-sig", errors="replace")
  n_replaced = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
  if n_replaced:
    logging.warning("%s: replaced %d invalid UTF-8 byte sequence(s) with U+FFFD", path, n_replaced)
  return text.replace("\r\n", "\n"), n_replaced


def _jsonl_documents(text: str, path: str, text_key: str) -> list[str]:
  docs = []
  for line_no, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
      raise ValueError(f"{path}:{line_no}: expected an object with a string field {text_key!r} "
                       "(set config.data.text_key to the field holding the text)")
    if record[text_key].strip():
      docs.append(record[text_key])
  return docs


def read_documents(patterns: str, text_key: str = "text") -> tuple[list[str], int]:
  """Documents of the files matched by comma-separated globs, in sorted path order.

  A `.txt` file holds documents separated by blank lines (so a file of one paragraph per
  document, or one big text, both work); a `.jsonl` file holds one JSON object per line with
  the document in field `text_key`. Invalid UTF-8 is replaced by U+FFFD with a warning.

  Returns:
    (documents, number of replacement characters introduced).
  """
  docs, n_replaced = [], 0
  paths = _expand(patterns)
  for path in paths:
    text, n = _read_text(path)
    n_replaced += n
    if path.endswith(".jsonl"):
      docs.extend(_jsonl_documents(text, path, text_key))
    else:
      docs.extend(d.strip("\n").rstrip() for d in _BLANK_LINES.split(text) if d.strip())
  if not docs:
    raise ValueError(f"no text in {', '.join(paths)}: the files are empty or whitespace only")
  return docs, n_replaced


def _public_docs(module_name: str) -> list[tuple[str, str]]:
  """(qualified name, docstring) of a module, its public functions, classes and methods."""
  module = importlib.import_module(module_name)
  named = [(module_name, module)]
  for name, obj in sorted(vars(module).items()):
    if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isfunction(obj):
      named.append((f"{module_name}.{name}", obj))
    elif inspect.isclass(obj):
      named.append((f"{module_name}.{name}", obj))
      named += [(f"{module_name}.{name}.{attr}", member)
                for attr, member in sorted(vars(obj).items())
                if not attr.startswith("_") and (
                    inspect.isfunction(member)
                    or isinstance(member, (property, classmethod, staticmethod)))]
  return [(qualname, doc) for qualname, obj in named if (doc := inspect.getdoc(obj))]


def demo_documents() -> list[str]:
  """About 1.2 MB of English shipped with every Python: `pydoc_data` topics and stdlib docstrings.

  One document per help topic and per documented module, class, function or method
  (headed by its qualified name), in a fixed order, without duplicates.
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  headed = [("", topics.topics[name]) for name in sorted(topics.topics)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for module_name in _DEMO_MODULES:
      headed += [(f"{qualname}\n\n", doc) for qualname, doc in _public_docs(module_name)]
  docs, seen = [], set()
  for header, doc in headed:
    if doc not in seen:
      seen.add(doc)
      docs.append(header + doc)
  return docs


def split_documents(docs: Sequence[str], valid_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
  """Holds out a random `valid_fraction` of the documents (at least one); both keep corpus order."""
  if not 0 < valid_fraction < 1:
    raise ValueError(f"valid_fraction {valid_fraction} must be in (0, 1), or give config.data.valid_files")
  n_valid = max(1, round(len(docs) * valid_fraction))
  if n_valid >= len(docs):
    raise ValueError(f"cannot hold out {valid_fraction:.0%} of {len(docs)} document(s) for validation: "
                     "add documents (blank lines separate documents in .txt files) or set "
                     "config.data.valid_files")
  is_valid = np.zeros(len(docs), bool)
  is_valid[np.random.default_rng(seed).permutation(len(docs))[:n_valid]] = True
  return ([d for d, v in zip(docs, is_valid) if not v], [d for d, v in zip(docs, is_valid) if v])
