"""Every reference to a document resolves inside the repository, anchors included.

Scanned: every text file git knows of (tracked, or untracked and not ignored). Checked:

* markdown links and images `[text](target)` in `*.md` files (outside code): the target, relative
  to the linking file, exists; a `#anchor` on a `*.md` target (or alone, for the same file) is one
  of the target's headings, as GitHub makes anchors of them;
* bare mentions of a markdown document in any file (`docs/methods.md#aavae` in a docstring, a
  recipe comment or a table cell): a path resolves from the repository root or from the
  mentioning file's folder, a bare file name names a document of that name anywhere in the
  repository, and the anchor, if any, is one of its headings. A document of another repository is
  cited by its URL, which is not a bare mention;
* bare mentions of a repository path of any other kind in any file: a path that starts with one of the
  project's top folders (`TOP_FOLDERS`: `tests/test_simclr.py`, `framework/eval/`) exists, from the
  root or from the mentioning file's folder; a glob (`recipes/*_imagenet.yaml`) or a brace list
  (`recipes/{vae,aavae}_fashionmnist.yaml`) matches a file for each alternative. Not checked:
  outputs written at run time (`OUTPUTS`, and `runs/`, which is no top folder), placeholders
  (`tests/{name}` in an f-string), and another repository's tree, recognised as a path going into a
  folder right under a top folder that augssl does not have (solo-learn's
  `scripts/pretrain/cifar/simclr.yaml`). A file of another repository directly in a folder of a top
  folder's name (a `scripts/...` file) is cited by its URL;
* no file, code included, names the project's old out-of-tree documents or a machine path
  (`FORBIDDEN`: the project's folder, a temporary or a home folder); a script that needs a folder
  takes one from `tempfile`.

`test_detects_each_kind_of_broken_reference` runs the same checker on a temporary tree with one
broken reference of each kind, so the check above cannot pass by finding nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
import posixpath
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import pytest

from tests.helpers import ROOT

# Spelled in pieces so that this file, which is scanned too, does not contain them.
FORBIDDEN = ("METHODS" + ".md", "DESIGN" + ".md", "../" + "shared", "/" + "work/", "/" + "tmp/", "/" + "home/")
TOP_FOLDERS = ("benchmarks", "docs", "examples", "framework", "launch", "plugins", "recipes", "scripts", "tests")
OUTPUTS = ("benchmarks/results/",)  # what the benchmarks write when they run, as a training run writes runs/

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
BARE = re.compile(r"(?<![\w./#-])((?:[\w.-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
# A path from a top folder, not inside a longer path (`src/...`, a URL's `/tests/...`) or after a `<placeholder>/`.
PATH = re.compile(r"(?<![\w./#<>$@-])((?:" + "|".join(TOP_FOLDERS) + r")/[\w.*?{},/-]*)")
BRACES = re.compile(r"\{([^{}]*)\}")


def repository_files(root: Path) -> list[str]:
    """Paths (relative, '/'-separated) of the files git tracks or would track under `root`; without
    git (an exported tree), every file outside hidden folders, caches, virtual environments and outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        listed = out.split("\0")
    except (OSError, subprocess.CalledProcessError):
        skip = {"__pycache__", "build", "data", "runs"}
        listed = [
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if not any(
                part.startswith(".") or part in skip or part.endswith(".egg-info") for part in p.relative_to(root).parts
            )
        ]
    return sorted({p for p in listed if p and (root / p).is_file()})


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower-cased, punctuation dropped
    (letters, digits, '_', '-' and spaces stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def expand_braces(pattern: str) -> list[str]:
    """Every alternative of a path's brace lists: `r/{a,b}.yaml` is `r/a.yaml` and `r/b.yaml`."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for alternative in match.group(1).split(",") for path in expand_braces(head + alternative + tail)]


def anchors(markdown: str) -> set[str]:
    """Every anchor of a markdown document: its headings' (GitHub numbers repeats -1, -2, ...) and
    explicit `<a id=...>` / `<a name=...>` ones."""
    found: set[str] = set(HTML_ANCHOR.findall(markdown))
    seen: dict[str, int] = {}
    for _, title in HEADING.findall(FENCE.sub("", markdown)):
        slug = github_anchor(title)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


class Checker:
    """Resolves document references of the files of one tree; `problems(path)` lists one line per broken one."""

    def __init__(self, root: Path, files: Iterable[str]) -> None:
        self.root = root
        self.files = sorted(files)
        self.by_name: dict[str, list[str]] = {}
        for f in self.files:
            self.by_name.setdefault(Path(f).name, []).append(f)
        self.folders = {parent.as_posix() for f in self.files for parent in PurePosixPath(f).parents}
        self._anchors: dict[str, set[str]] = {}
        # (document, missing anchor) -> where it is referenced: a renamed heading is one problem, not one per use
        self.missing_anchors: dict[tuple[str, str], list[str]] = {}

    def anchors_of(self, rel: str) -> set[str]:
        if rel not in self._anchors:
            self._anchors[rel] = anchors((self.root / rel).read_text(encoding="utf-8"))
        return self._anchors[rel]

    def _relative(self, path: Path) -> str | None:
        """`path` relative to the root, '/'-separated, if it is inside the tree and exists."""
        try:
            rel = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        return rel.as_posix() if path.exists() else None

    def _bare_targets(self, source: str, mention: str) -> list[str]:
        """The documents a bare mention can name: a path from the root or from the mentioning
        file's folder; a bare file name, any document of that name."""
        if "/" not in mention:
            return self.by_name.get(mention, [])
        candidates = [self.root / mention, (self.root / source).parent / mention]
        return sorted({rel for rel in (self._relative(c) for c in candidates) if rel is not None})

    def _exists(self, rel: str) -> bool:
        """`rel` (a path or a glob, from the root) names a file or folder of the tree."""
        if any(c in rel for c in "*?"):
            return any(fnmatch.fnmatchcase(f, rel) for f in self.files)
        return rel in self.folders or rel in self.by_name.get(posixpath.basename(rel), [])

    def _missing_paths(self, source: str, mention: str) -> list[str]:
        """The alternatives of a bare mention of a path from a top folder that name nothing in the tree, from
        the root or from `source`'s folder; none for what is not checked (see the module's docstring)."""
        if mention.endswith(".md") or mention.startswith(OUTPUTS):
            return []  # a document, checked with its anchor as a bare mention; an output written at run time
        if any("," not in group for group in BRACES.findall(mention)):
            return []  # a placeholder: tests/{name}
        top, _, rest = mention.partition("/")
        first, _, below = rest.partition("/")
        if below and not any(c in first for c in "*?{") and f"{top}/{first}" not in self.folders:
            return []  # into a folder augssl does not have: another repository's tree
        bases = ("", posixpath.dirname(source))
        return [
            path
            for path in expand_braces(mention)
            if not any(self._exists(posixpath.normpath(posixpath.join(base, path))) for base in bases)
        ]

    def problems(self, source: str) -> list[str]:
        text = read_text(self.root / source)
        if text is None:
            return []
        found = [f"{source}: names {word!r}, which is outside the repository" for word in FORBIDDEN if word in text]
        if source.endswith(".md"):
            found += self._link_problems(source, text)
            text = LINK.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # links are checked as links
        for match in BARE.finditer(text):
            mention, anchor = match.group(1), match.group(2)
            if any(mention.endswith(word) for word in FORBIDDEN):
                continue  # reported above
            targets = self._bare_targets(source, mention)
            line = text.count("\n", 0, match.start()) + 1
            if not targets:
                found.append(f"{source}:{line}: {mention} does not exist in the repository")
            elif anchor and not any(anchor in self.anchors_of(t) for t in targets):
                self.missing_anchors.setdefault((" or ".join(targets), anchor), []).append(f"{source}:{line}")
        for match in PATH.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            for path in self._missing_paths(source, match.group(1).rstrip(".,;:-")):
                found.append(f"{source}:{line}: {path} does not exist in the repository")
        return found

    def _link_problems(self, source: str, text: str) -> list[str]:
        found = []
        prose = CODE_SPAN.sub("", FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text))
        for match in LINK.finditer(prose):
            target = match.group(1)
            if SCHEME.match(target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            rel = source if not path else self._relative((self.root / source).parent / path)
            if rel is None:
                found.append(f"{source}: link to {target}: {path} does not exist in the repository")
            elif anchor and rel.endswith(".md") and anchor not in self.anchors_of(rel):
                line = prose.count("\n", 0, match.start()) + 1
                self.missing_anchors.setdefault((rel, anchor), []).append(f"{source}:{line}")
        return found

    def anchor_problems(self) -> list[str]:
        """One line per missing anchor: the document, the anchor, its closest headings, every place using it."""
        found = []
        for (documents, anchor), uses in sorted(self.missing_anchors.items()):
            existing = set().union(*(self.anchors_of(d) for d in documents.split(" or ")))
            close = sorted(existing, key=lambda a: -difflib.SequenceMatcher(None, anchor, a).ratio())[:3]
            found.append(
                f"{documents} has no heading for #{anchor} (renamed? its closest: "
                f"{', '.join('#' + a for a in close) or 'none'}); point these {len(uses)} reference(s) to the "
                f'heading\'s new anchor, or add an <a id="{anchor}"></a> beside it: {", ".join(uses)}'
            )
        return found


def broken_references(root: Path, files: Iterable[str]) -> list[str]:
    """One line per broken document reference in `files` (paths relative to `root`)."""
    checker = Checker(root, files)
    return [problem for source in checker.files for problem in checker.problems(source)] + checker.anchor_problems()


def test_every_document_reference_resolves():
    problems = broken_references(ROOT, repository_files(ROOT))
    assert not problems, "broken document references:\n" + "\n".join(problems)


def test_methods_reference_exists_with_a_section_per_method():
    sections = anchors((ROOT / "docs" / "methods.md").read_text(encoding="utf-8"))
    methods = ["vae", "aavae", "cr-vae", "affine-head", "simclr", "byol", "barlow-twins", "online-probe"]
    assert set(methods) <= sections, f"docs/methods.md lacks sections {sorted(set(methods) - sections)}"


def test_methods_reference_parameter_counts_are_the_code_s():
    """The parameter counts docs/methods.md gives for the backbones are those of the modules as built."""
    from plugins import backbones

    def count(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()):,}"

    doc = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    modules = {
        "ResNet-18 decoder": backbones.ResNetDecoder("resnet18", 128, 32, 3, "cifar"),
        "ResNet-50 decoder": backbones.ResNetDecoder("resnet50", 128, 96, 3, "stl"),
        "conv28 decoder": backbones.Conv28Decoder(64, 28, 1),
        "VAE head on 2048": backbones.VAEHead(2048, 128, (-10.0, 10.0)),
        "ResNet-50 encoder": backbones.build_encoder(backbones.BackbonesConfig(encoder="resnet50", stem="stl"), 3, 96),
        "conv28 encoder": backbones.build_encoder(backbones.BackbonesConfig(encoder="conv28"), 1, 28),
    }
    missing = {name: count(m) for name, m in modules.items() if count(m) not in doc}
    assert not missing, f"docs/methods.md does not give these parameter counts: {missing}"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("AAVAE", "aavae"),
        ("The affine head (`affine`)", "the-affine-head-affine"),
        ("CR-VAE: consistency, λ and β", "cr-vae-consistency-λ-and-β"),
        ("[Linked](elsewhere) title", "linked-title"),
    ],
)
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


# The temporary tree's documents; "@md" stands for the extension and "@/" for a path's "/" (this file is scanned too).
GOOD_DOC = """# Guide

## Two words

## Two words

See [the other](sub/other@md#deep-part), [itself](#two-words-1), [a page](https://example.org/x@md#y),
[a folder](sub) and `own["head"](features)`, which is code.

```python
own["head"](features)
```
"""
GOOD_CODE = (
    '"""Follows guide@md#guide and sub/other@md#deep-part (other@md, of the same folder).\n\n'
    "Runs recipes@/{a,b}.yaml (recipes@/*.yaml, recipes@/), writes benchmarks@/results/x.json,\n"
    "takes solo-learn's scripts@/pretrain/cifar/simclr.yaml and its src/tests@/x.py; reads tests@/{name}.\n"
    '"""\n'
)

BROKEN = {
    "a link to a missing file": "[x](sub/nowhere@md)",
    "a link to a missing heading": "[x](sub/other@md#no-such-part)",
    "a same-file link to a missing heading": "[x](#two-words-2)",
    "a bare mention of a missing document": "see docs@/nowhere@md for more",
    "a bare mention with a missing heading": "see sub/other@md#no-such-part",
    "an old out-of-tree document": "see " + FORBIDDEN[0],
    "a path of the machine": "in " + FORBIDDEN[3] + "main",
    "a temporary folder": '"output_dir": "' + FORBIDDEN[4] + 'unused"',
    "a home folder": "from " + FORBIDDEN[5] + "someone/data",
    "a bare mention of a missing file": "tests@/test_nowhere.py checks both",
    "a bare mention of a missing folder": "see recipes@/old/",
    "a glob that matches no file": "every recipes@/*_nowhere.yaml",
    "a brace list with a missing alternative": "recipes@/{a,nowhere}.yaml",
}


def write_tree(root: Path, extra: str) -> list[str]:
    """A small tree of valid references, with `extra` appended to its guide; returns its files."""
    files = {
        "sub/other@md": "# Other\n\n### Deep part\n\nIts tests@/t.py, from its own folder.\n",
        "guide@md": GOOD_DOC + extra + "\n",
        "code.py": GOOD_CODE,
        "recipes@/a.yaml": "",
        "recipes@/b.yaml": "",
        "sub/tests/t.py": "",
    }
    written = []
    for name, text in files.items():
        path = root / name.replace("@md", ".md").replace("@/", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("@md", ".md").replace("@/", "/"), encoding="utf-8")
        written.append(path.relative_to(root).as_posix())
    return sorted(written)


def test_a_tree_of_valid_references_passes(tmp_path):
    assert broken_references(tmp_path, write_tree(tmp_path, "")) == []


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_detects_each_kind_of_broken_reference(tmp_path, kind):
    problems = broken_references(tmp_path, write_tree(tmp_path, BROKEN[kind]))
    guide = "guide@md".replace(
        "@md", ".md"
    )  # the broken reference is in the guide: its line, or a missing anchor's use
    assert len(problems) == 1 and (problems[0].startswith(guide) or f"beside it: {guide}:" in problems[0]), problems


def test_a_renamed_heading_is_one_problem_naming_its_closest_headings_and_every_use(tmp_path):
    files = write_tree(tmp_path, "See [x](sub/other@md#deep-parts).\n\nAnd [y](sub/other@md#deep-parts).")
    (tmp_path / "code.py").write_text('"""See sub/other@md#deep-parts."""\n'.replace("@md", ".md"))
    message = (
        "sub/other@md has no heading for #deep-parts (renamed? its closest: #deep-part, #other); point these 3 "
        'reference(s) to the heading\'s new anchor, or add an <a id="deep-parts"></a> beside it: code.py:1, '
        "guide@md:13, guide@md:15"
    )
    assert broken_references(tmp_path, files) == [message.replace("@md", ".md")]
