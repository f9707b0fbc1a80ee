"""English sentences from installed packages, for distilling a real sentence encoder.

Nothing is downloaded: the sentences are the docstrings of standard-library,
numpy, scipy, scikit-learn, torch and other installed modules and the
descriptions of scikit-learn's bundled datasets, split into sentences, filtered
to prose and deduplicated (about 22,000). The same
installed versions give the same sentences in the same (seeded) order.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Iterator

#: Modules whose docstrings (and those of their public members) give the sentences.
MODULES = (
    "os", "re", "json", "collections", "itertools", "functools", "pathlib", "typing",
    "string", "datetime", "random", "statistics", "math", "decimal", "fractions", "csv",
    "logging", "argparse", "subprocess", "threading", "asyncio", "socket", "email",
    "http.client", "urllib.parse", "unittest", "difflib", "textwrap", "shutil", "tempfile",
    "zipfile", "tarfile", "pickle", "sqlite3", "heapq", "bisect", "contextlib",
    "dataclasses", "enum", "inspect", "ast", "calendar", "hashlib", "gzip", "io", "abc",
    "copy", "pprint", "queue", "sched", "selectors", "signal", "struct", "uuid",
    "xml.etree.ElementTree", "html", "configparser", "getopt", "glob", "fnmatch", "locale",
    "gettext", "operator", "weakref", "numpy", "numpy.linalg", "numpy.fft", "numpy.random",
    "numpy.ma", "sklearn.linear_model", "sklearn.ensemble", "sklearn.cluster",
    "sklearn.decomposition", "sklearn.svm", "sklearn.tree", "sklearn.metrics",
    "sklearn.preprocessing", "sklearn.model_selection", "sklearn.neighbors",
    "sklearn.naive_bayes", "sklearn.pipeline", "sklearn.feature_extraction.text",
    "sklearn.manifold", "sklearn.mixture", "sklearn.feature_selection", "sklearn.covariance",
    "sklearn.cross_decomposition", "sklearn.gaussian_process", "sklearn.isotonic",
    "sklearn.kernel_approximation", "sklearn.kernel_ridge", "sklearn.neural_network",
    "sklearn.semi_supervised", "sklearn.calibration", "sklearn.compose", "sklearn.impute",
    "sklearn.inspection", "sklearn.multiclass", "sklearn.random_projection",
    "sklearn.discriminant_analysis", "sklearn.dummy", "sklearn.utils", "numpy.polynomial",
    "scipy.stats", "scipy.linalg", "scipy.optimize", "scipy.signal", "scipy.sparse",
    "scipy.interpolate", "scipy.integrate", "scipy.spatial", "scipy.special", "scipy.ndimage",
    "networkx", "networkx.algorithms", "sympy", "matplotlib.pyplot", "matplotlib.axes",
    "matplotlib.figure", "sqlalchemy", "sqlalchemy.orm", "pydantic", "celery", "kombu",
    "torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.utils.data", "PIL.Image",
    "jinja2", "click", "requests", "email.message", "http.server", "urllib.request",
    "multiprocessing", "concurrent.futures", "doctest", "pdb", "trace", "tokenize", "codecs",
    "zoneinfo", "secrets", "hmac", "base64", "binascii", "mailbox", "imaplib", "smtplib",
    "ftplib", "poplib", "xmlrpc.client", "wsgiref", "sysconfig", "platform", "importlib",
    "pkgutil", "runpy", "shelve", "dbm", "zlib", "bz2", "lzma", "array", "mmap", "ctypes",
    "cmath", "numbers", "graphlib", "reprlib", "types", "warnings", "traceback", "gc",
    "timeit", "cProfile", "pstats", "plistlib", "netrc", "colorsys", "wave", "optparse",
    "cmd", "shlex", "filecmp", "stat", "linecache", "tomllib",
)  # fmt: skip
_DATASETS = (
    "load_iris",
    "load_diabetes",
    "load_digits",
    "load_wine",
    "load_breast_cancer",
    "load_linnerud",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NOT_PROSE = (">>>", "...", "--", "==", "..", "|", "*")


def _documents() -> Iterator[str]:
    """Docstrings of :data:`MODULES` and their own public members, then the datasets' DESCR."""
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        yield inspect.getdoc(module) or ""
        package = name.split(".")[0]
        for attribute in sorted(dir(module)):
            if attribute.startswith("_"):
                continue
            member = getattr(module, attribute, None)
            owner = str(getattr(member, "__module__", "") or "")
            doc = inspect.getdoc(member) if member is not None else None
            if doc and owner.split(".")[0] == package:
                yield doc
    from sklearn import datasets

    for loader in _DATASETS:
        yield getattr(datasets, loader)().DESCR


def _is_prose(sentence: str) -> bool:
    """40-200 characters, capitalised, ended, and mostly letters and spaces."""
    if not 40 <= len(sentence) <= 200:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    letters = sum(character.isalpha() or character == " " for character in sentence)
    return letters >= 0.85 * len(sentence)


def installed_sentences(seed: int = 0) -> list[str]:
    """Distinct prose sentences (case-insensitively) from installed packages, shuffled."""
    seen: set[str] = set()
    sentences: list[str] = []
    for document in _documents():
        for paragraph in re.split(r"\n\s*\n", document):
            lines = [line.strip() for line in paragraph.splitlines()]
            if any(line.startswith(_NOT_PROSE) for line in lines):
                continue
            for sentence in _SENTENCE_END.split(" ".join(lines)):
                sentence = sentence.strip()
                if _is_prose(sentence) and sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    sentences.append(sentence)
    random.Random(seed).shuffle(sentences)
    return sentences
