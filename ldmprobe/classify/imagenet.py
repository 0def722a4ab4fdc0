"""The classes a classifier answers in: ImageNet-1k (timm's offline tables; a target looked up by
index, WordNet id or name) or a named set (the scenes classifier's "red sphere" …): `ClassSet`.
The errors of the classify package."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel


class ClassifyError(ValueError):
    """Bad input to classification (CLI: one line, exit 2; HTTP: 400)."""


class UnknownClassError(ClassifyError):
    """A target class that names no ImageNet class, or several; the message lists close matches."""


class ClassInfo(BaseModel):
    index: int
    wnid: str
    name: str


# --- ImageNet classes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    names: tuple[str, ...]  # the synonyms of timm's description, first = the usual name

    @property
    def name(self) -> str:
        return self.names[0]

    def info(self) -> ClassInfo:
        return ClassInfo(index=self.index, wnid=self.wnid, name=self.name)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 ImageNet-1k classes in classifier output order (timm's offline tables)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(ImageNetClass(i, info.index_to_label_name(i),
                               tuple(s.strip() for s in info.index_to_description(i).split(", ")))
                 for i in range(info.num_classes()))


@lru_cache(maxsize=1)
def _name_index() -> tuple[dict[str, list[int]], dict[str, int]]:
    """Lower-cased synonym → class indices (a few synonyms name two classes), wnid → index."""
    by_name: dict[str, list[int]] = {}
    for c in imagenet_classes():
        for syn in dict.fromkeys(s.lower() for s in c.names):
            by_name.setdefault(syn, []).append(c.index)
    return by_name, {c.wnid: c.index for c in imagenet_classes()}


def _close_matches(query: str, limit: int = 5) -> str:
    by_name, _ = _name_index()
    names = [n for n in by_name if query in n] + difflib.get_close_matches(query, by_name, n=2 * limit, cutoff=0.6)
    found: dict[tuple[int, ...], str] = {}  # one entry per class (set), first matching name
    for n in names:
        found.setdefault(tuple(by_name[n]), n)
    if not found:
        return "no close matches; give an index 0-999, a WordNet id (n07749582) or a class name"
    return "close matches: " + ", ".join(f"{n} ({'/'.join(map(str, idx))})" for idx, n in list(found.items())[:limit])


def imagenet_class(query: int | str) -> ImageNetClass:
    """Resolve a class by index (951, "951"), WordNet id ("n07749582") or name ("lemon",
    "Granny Smith", a synonym such as "man-eater"; case-insensitive, "_" as " "). A name that no
    class or several classes carry ("crane") raises UnknownClassError listing the candidates."""
    classes = imagenet_classes()
    if isinstance(query, bool) or not isinstance(query, int | str):
        raise UnknownClassError(f"class must be an index, WordNet id or name, got {type(query).__name__}")
    text = str(query).strip()
    if not text:
        raise UnknownClassError("class must not be empty; give an index 0-999, a WordNet id or a class name")
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if not 0 <= index < len(classes):
            raise UnknownClassError(f"class index {index} is out of range 0-{len(classes) - 1}")
        return classes[index]
    by_name, by_wnid = _name_index()
    if re.fullmatch(r"n\d{8}", text.lower()):
        if text.lower() not in by_wnid:
            raise UnknownClassError(f"WordNet id {text!r} is not an ImageNet-1k class")
        return classes[by_wnid[text.lower()]]
    key = " ".join(text.replace("_", " ").lower().split())
    full = [c for c in classes if ", ".join(c.names).lower() == key]
    hits = [classes[i] for i in by_name.get(key, [])] or full
    if len(hits) == 1:
        return hits[0]
    if hits:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        options = "; ".join(f"{c.index} {c.wnid} ({info.index_to_description(c.index, detailed=True)[:70]}…)"
                            for c in hits)
        raise UnknownClassError(f"class name {text!r} is ambiguous: {options}; give the index or WordNet id")
    raise UnknownClassError(f"unknown ImageNet class {text!r}; {_close_matches(key)}")


# --- the classes of a classifier ---------------------------------------------------------------------
class ClassSet:
    """The output classes of one classifier, in output order, and the lookup of a target among them.
    ImageNet-1k (`ClassSet.imagenet()`) resolves as `imagenet_class`; a named set (`from_names`)
    by index or case-insensitive name. The id of a named class (ClassInfo.wnid) is ``set:slug``."""

    def __init__(self, name: str, classes: tuple[ImageNetClass, ...]):
        self.name, self.classes = name, classes
        self._by_name = {" ".join(c.name.lower().replace("_", " ").split()): c for c in classes}

    @classmethod
    @lru_cache(maxsize=1)
    def imagenet(cls) -> ClassSet:
        return cls("imagenet-1k", imagenet_classes())

    @classmethod
    def from_names(cls, name: str, names: list[str] | tuple[str, ...]) -> ClassSet:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"class names of {name!r} must be unique and not empty")
        return cls(name, tuple(ImageNetClass(i, f"{name}:{n.replace(' ', '-')}", (n,)) for i, n in enumerate(names)))

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> ImageNetClass:
        return self.classes[index]

    def resolve(self, query: int | str) -> ImageNetClass:
        """The class a target names (index or name); UnknownClassError naming close matches."""
        if self.name == "imagenet-1k":
            return imagenet_class(query)
        if isinstance(query, bool) or not isinstance(query, int | str):
            raise UnknownClassError(f"class must be an index or a name, got {type(query).__name__}")
        text = str(query).strip()
        if re.fullmatch(r"[+-]?\d+", text):
            if not 0 <= int(text) < len(self.classes):
                raise UnknownClassError(f"class index {int(text)} is out of range 0-{len(self.classes) - 1}")
            return self.classes[int(text)]
        key = " ".join(text.lower().replace("_", " ").split())
        if key in self._by_name:
            return self._by_name[key]
        close = difflib.get_close_matches(key, list(self._by_name), n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"classes: {', '.join(list(self._by_name)[:8])} …"
        raise UnknownClassError(f"unknown {self.name} class {text!r}; {hint}")
