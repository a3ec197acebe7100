"""``--source debian-docs``: an offline prose corpus from Debian's documentation packages.

The Handbook's compute-optimal studies need tens of millions of tokens of natural-language text on machines that
reach no web, only the package registries. Debian ships exactly that: user manuals, reference guides and books as
HTML, reStructuredText, POD and plain text, and public-domain books (Spurgeon's *Treasury of David*, Matthew
Henry's concise commentary, the World English Bible) as SWORD modules. The manifest ``corpus/debian-docs.toml``
pins each package's version and the sha256 of its ``.deb``, the files taken from it (regular expressions on the
path inside the package), their format and the licence; so every machine that can fetch the same ``.deb`` files
gets the same documents, in the same order, and therefore the same tokens.

Fetching: ``apt-get download NAME=VERSION`` into a cache directory (``$NANOGROW_DEB_CACHE``, default
``~/.cache/nanogrow/debs``; no root needed, but apt's package lists must be there: ``apt-get update``). A ``.deb``
already in the cache is checked against the manifest's sha256 and used as it is. Debian's archive keeps only the
newest version of a package: once a pinned one is superseded, prep says so by name, and ``NANOGROW_DEB_LATEST=1``
takes the current one instead (another corpus; meta.json records every package's version and sha256). Nothing is
installed: the ``.deb`` (an ``ar`` archive around ``data.tar.*``) is read in Python.

Documents: one per file (one per block of a SWORD module: a book, or a chapter of a commentary; one per fortune),
converted to plain text, then deduplicated on their normalised text (case and whitespace folded): a page shipped
twice, in two packages or two formats, counts once. Pages shorter than ``MIN_CHARS`` (indexes, redirects) are
dropped. The documents come out in the order of a hash of their normalised text: a fixed, machine-independent
shuffle, so that prep's every-k-th-document val and test splits and its tokenizer sample span every package.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tomllib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "corpus" / "debian-docs.toml"
MIN_CHARS = 200  # shorter pages are navigation or indexes (fortunes: 40, see Package.min_chars)
FORMATS = ("html", "rst", "pod", "text", "info", "fortune", "sword")


class CorpusError(ValueError):
    """A package that cannot be fetched, a checksum that does not match, a manifest entry that is wrong."""


@dataclass
class Package:
    name: str
    version: str
    sha256: str
    license: str
    format: str
    files: list[str] = field(default_factory=list)  # regexes on the path inside the package (search)
    exclude: list[str] = field(default_factory=list)
    min_chars: int = MIN_CHARS

    def matches(self, path: str) -> bool:
        return any(re.search(rx, path) for rx in self.files) and not any(re.search(rx, path) for rx in self.exclude)


def load_manifest(path: str | os.PathLike | None = None) -> tuple[dict, list[Package]]:
    path = Path(path or MANIFEST)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CorpusError(f"{path}: cannot read the corpus manifest: {e}") from None
    keys = {"name", "version", "sha256", "license", "format", "files", "exclude", "min_chars"}
    packages = []
    for i, p in enumerate(raw.get("package", []), start=1):
        bad = set(p) - keys
        missing = {"name", "version", "sha256", "license", "format", "files"} - set(p)
        if bad or missing:
            raise CorpusError(f"{path}: package[{i}] ({p.get('name', '?')}): unknown keys {sorted(bad)}, missing "
                              f"{sorted(missing)}")
        if p["format"] not in FORMATS:
            raise CorpusError(f"{path}: package {p['name']}: format {p['format']!r} is not one of {', '.join(FORMATS)}")
        if not re.fullmatch(r"[0-9a-f]{64}", p["sha256"]):
            raise CorpusError(f"{path}: package {p['name']}: sha256 must be 64 hex digits")
        packages.append(Package(**p))
    if not packages:
        raise CorpusError(f"{path}: no [[package]] entries")
    return raw.get("corpus", {}), packages


# ---- fetching and reading a .deb ----------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("NANOGROW_DEB_CACHE", Path.home() / ".cache" / "nanogrow" / "debs"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def latest_allowed() -> bool:
    """``NANOGROW_DEB_LATEST=1``: take the archive's current version of a package whose pinned one is gone
    (Debian's archive keeps only the newest); the corpus then differs from the manifest's, and meta.json says how."""
    return os.environ.get("NANOGROW_DEB_LATEST", "") == "1"


def fetch(pkg: Package, cache: Path | None = None) -> tuple[Path, str, str]:
    """The package's ``.deb`` in the cache, downloaded with apt-get if missing; returns (path, version, sha256),
    the pinned ones, checked, or with ``NANOGROW_DEB_LATEST=1`` and the pinned version gone, the current ones."""
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    want = cache / f"{pkg.name}_{pkg.version.replace(':', '%3a')}.deb"
    if not want.exists():
        why = _apt_download(f"{pkg.name}={pkg.version}", want, cache)
        if why is not None and latest_allowed():
            latest = cache / f"{pkg.name}_latest.deb"
            if latest.exists() or _apt_download(pkg.name, latest, cache) is None:
                return latest, "latest (NANOGROW_DEB_LATEST=1)", sha256_of(latest)
        if why is not None:
            raise CorpusError(f"package {pkg.name}={pkg.version}: {why}. Run `apt-get update` (as root) first; if "
                              f"Debian has moved on to a newer version (its archive keeps only the newest), "
                              f"NANOGROW_DEB_LATEST=1 takes that one (a different corpus: meta.json records each "
                              f"package's sha256), or update {MANIFEST.name}")
    digest = sha256_of(want)
    if digest != pkg.sha256:
        raise CorpusError(f"package {pkg.name}={pkg.version}: {want} has sha256 {digest}, the manifest says "
                          f"{pkg.sha256}; delete the file to download it again")
    return want, pkg.version, digest


def _apt_download(spec: str, dest: Path, cache: Path) -> str | None:
    """``apt-get download SPEC`` into ``dest``; None on success, else why not."""
    if shutil.which("apt-get") is None:
        return (f"not in {cache} and there is no apt-get here (the debian-docs corpus needs Debian's package "
                f"archive, or the .deb files placed in {cache} as NAME_VERSION.deb)")
    tmp = cache / f".download-{dest.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        proc = subprocess.run(["apt-get", "download", spec], cwd=tmp, capture_output=True, text=True)
        got = sorted(tmp.glob("*.deb"))
        if proc.returncode != 0 or len(got) != 1:
            return "apt-get download failed (" + (proc.stderr.strip().splitlines() or ["no .deb downloaded"])[-1] + ")"
        os.replace(got[0], dest)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    """(path without the leading ./, bytes) of every regular file in the .deb's data.tar.*, in archive order."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CorpusError(f"{deb}: not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise CorpusError(f"{deb}: no data.tar member")
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                data = f.read(size)
                break
            f.seek(size + (size & 1), 1)  # members are 2-byte aligned
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            if m.isfile():
                yield m.name.removeprefix("./"), tar.extractfile(m).read()


# ---- converters -------------------------------------------------------------------------------------------------

BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "table", "dt", "dd",
              "dl", "section", "blockquote", "br", "hr", "article", "td", "th", "caption", "figure", "title", "body"}
SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "math", "button", "form", "select", "iframe",
             "footer", "header"}
SKIP_CLASS = re.compile(r"\b(sphinxsidebar|related|footer|navheader|navfooter|navigation|breadcrumb|sidebar|"
                        r"headerlink|topnav|search|menu|toc)\b")
PAGE_TAGS = {"html", "body", "main", "article"}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source", "embed", "param"}


class _HTMLText(HTMLParser):
    """Visible text of a page: block elements become paragraph breaks, navigation and scripts are dropped,
    preformatted text keeps its lines."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip: list[list] = []  # [tag, nesting depth] of the element being skipped
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            if tag in ("br", "hr") and not self.skip:
                self.out.append("\n")
            return
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] += 1
            return
        cls = " ".join(v or "" for k, v in attrs if k in ("class", "id", "role"))
        # Page-level elements are never skipped by their class (mdBook's <body class="sidebar-visible">).
        if tag in SKIP_TAGS or (cls and tag not in PAGE_TAGS and SKIP_CLASS.search(cls)):
            self.skip.append([tag, 1])
            return
        self.pre += tag == "pre"
        if tag in BLOCK_TAGS:
            self.out.append("\n\n")

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] -= 1
                if not self.skip[-1][1]:
                    self.skip.pop()
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in BLOCK_TAGS:
            self.out.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def tidy(text: str) -> str:
    text = re.sub(r"[ \t\u00a0]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+(?=\S)", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_text(raw: bytes) -> str:
    parser = _HTMLText()
    parser.feed(raw.decode("utf-8", "replace"))
    parser.close()
    return tidy("".join(parser.out))


RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
RST_MARKUP = re.compile(r"^\.\. [\w:-]+::.*$|^\.\. _[^:]+:.*$|^\.\. \|.*$|^\s*:[\w -]+:.*$", re.M)


def rst_text(raw: bytes) -> str:
    """reStructuredText (Sphinx ``_sources``, the kernel's Documentation/) without roles, directives, targets and
    section underlines; the prose and code blocks stay."""
    text = RST_ROLE.sub(r"\1", raw.decode("utf-8", "replace"))
    text = RST_MARKUP.sub("", text)
    text = re.sub(r"^([=\-~^\"#*+`'.:_]{3,})\s*$", "", text, flags=re.M)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_{1,2}", r"\1", text)
    return tidy(re.sub(r"\*\*([^*]+)\*\*", r"\1", text))


POD_CODE = re.compile(r"[BICFSLEXZ]<<+\s(.*?)\s>>+|[BICFSLEXZ]<([^<>]*)>", re.S)


def pod_text(raw: bytes) -> str:
    """Perl's POD: headings and items kept as lines, other commands dropped, formatting codes unwrapped."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", raw.decode("utf-8", "replace")):
        if para.startswith("="):
            m = re.match(r"=(head\d|item)\s+(.*)", para, re.S)
            if m:
                paragraphs.append(m.group(2).strip())
            continue
        paragraphs.append(para)
    text = "\n\n".join(paragraphs)
    for _ in range(3):  # codes nest: B<I<...>>
        text = POD_CODE.sub(lambda m: (m.group(1) or m.group(2) or "").split("|")[0], text)
    return tidy(text)


def info_text(raw: bytes) -> str:
    """GNU Info: node separators, tag tables and menus dropped."""
    text = raw.decode("utf-8", "replace")
    text = re.sub(r"\x1f\n(Tag Table|End Tag Table|Indirect|Local Variables).*?(?=\x1f|\Z)", "", text, flags=re.S)
    text = re.sub(r"\x1f\nFile: [^\n]*\n", "\n", text).replace("\x1f", "").replace("\x7f", "")
    text = re.sub(r"^\* Menu:.*$|^\* [^\n]*::.*$", "", text, flags=re.M)
    return tidy(re.sub(r"^([*=\-.]{3,})\s*$", "", text, flags=re.M))


def plain_text(raw: bytes) -> str:
    return tidy(raw.decode("utf-8", "replace"))


def fortunes(raw: bytes) -> list[str]:
    return [tidy(c) for c in re.split(r"\n%\n", raw.decode("utf-8", "replace")) if c.strip()]


OSIS_TAG = re.compile(r"<[^>]+>")
OSIS_NOTE = re.compile(r"<note[^>]*>.*?</note>", re.S)


def sword_module(files: dict[str, bytes], conf_path: str) -> Iterator[tuple[str, str]]:
    """The documents of a compressed SWORD module (zText / zCom and their ``4`` variants): one per compressed block
    (a book, or a chapter, as the module's BlockType says). The verse index cuts a block into entries; a commentary's
    entries overlap (one comment covers several verses), so each block's text is the union of its entries' byte
    ranges, one entry per line, with the OSIS markup removed and notes dropped. The index's entry size (10 or 12
    bytes) is the one under which every entry lies inside its block: the ``4`` drivers do not always use 12 (the
    packaged Matthew Henry commentary, zCom4, has 10-byte entries)."""
    conf = files[conf_path].decode("utf-8", "replace")
    data_path = re.search(r"^DataPath=\./(.*?)/?\s*$", conf, re.M).group(1)
    driver = re.search(r"^ModDrv=(\S+)", conf, re.M).group(1)
    if not driver.startswith(("zText", "zCom")):
        raise CorpusError(f"{conf_path}: SWORD driver {driver} is not supported (zText, zCom)")
    root = f"usr/share/sword/{data_path}"
    for testament in ("ot", "nt"):
        kind = next((k for k in "bc" if f"{root}/{testament}.{k}zs" in files), None)
        if kind is None:
            continue
        index, blob = files[f"{root}/{testament}.{kind}zs"], files[f"{root}/{testament}.{kind}zz"]
        blocks = [zlib.decompress(blob[off:off + size]) for off, size, _ in struct.iter_unpack("<III", index)]
        ranges = _verse_ranges(files[f"{root}/{testament}.{kind}zv"], blocks, driver.endswith("4"), conf_path)
        for block in sorted(ranges):
            merged: list[list[int]] = []
            for start, end in sorted(ranges[block]):
                if merged and start < merged[-1][1]:  # overlapping (a comment on several verses), not adjacent
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            lines = []
            for start, end in merged:
                text = blocks[block][start:end].decode("utf-8", "replace")
                text = re.sub(r"[ \t]+", " ", unescape(OSIS_TAG.sub(" ", OSIS_NOTE.sub("", text)))).strip()
                if text:
                    lines.append(text)
            if lines:
                yield f"{root}/{testament}#{block}", "\n".join(lines)


def _verse_ranges(index: bytes, blocks: list[bytes], wide_first: bool, where: str) -> dict[int, set]:
    """{block: {(start, end), ...}} of the verse index's non-empty entries, under the entry size (12 or 10 bytes:
    block, offset, size as u32, u32, u32 or u16) that keeps every entry inside its block."""
    for fmt in (("<III", "<IIH") if wide_first else ("<IIH", "<III")):
        size = struct.calcsize(fmt)
        if len(index) % size:
            continue
        entries = [e for e in struct.iter_unpack(fmt, index) if e[2]]
        if all(b < len(blocks) and o + n <= len(blocks[b]) for b, o, n in entries):
            out: dict[int, set] = {}
            for b, o, n in entries:
                out.setdefault(b, set()).add((o, o + n))
            return out
    raise CorpusError(f"{where}: the verse index fits neither 10- nor 12-byte entries")


# ---- the corpus -------------------------------------------------------------------------------------------------

CONVERT = {"html": html_text, "rst": rst_text, "pod": pod_text, "text": plain_text, "info": info_text}


def package_documents(pkg: Package, deb: Path) -> Iterator[tuple[str, str]]:
    """(path, text) of the package's documents, in path order."""
    if pkg.format == "sword":
        files = dict(deb_members(deb))
        for conf in sorted(p for p in files if pkg.matches(p)):
            yield from sword_module(files, conf)
        return
    chosen = sorted((path, raw) for path, raw in deb_members(deb) if pkg.matches(path))
    for path, raw in chosen:
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
        if pkg.format == "fortune":
            for i, text in enumerate(fortunes(raw)):
                yield f"{path}#{i}", text
        else:
            yield path, CONVERT[pkg.format](raw)


def normalised_hash(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def iter_debian_docs(manifest: str | os.PathLike | None = None, cache: Path | None = None,
                     stats: dict | None = None) -> Iterator[str]:
    """The corpus's documents, deduplicated, in a fixed pseudo-random order (sorted by a hash of their text): the
    manifest's order is by package, and every k-th document going to val / test must sample the whole corpus, as
    must the tokenizer's training sample (the first characters of the stream). Every package is fetched and checked
    before anything is converted (a missing package fails before any compute is spent). ``stats``, if given, is
    filled with per-package counts (documents, characters, duplicates and short pages dropped)."""
    _, packages = load_manifest(manifest)
    fetched = [fetch(p, cache) for p in packages]
    docs: dict[bytes, str] = {}  # normalised-text hash -> text; the hash is also the sort key
    for pkg, (deb, version, sha) in zip(packages, fetched):
        row = {"version": version, "sha256": sha, "license": pkg.license, "documents": 0, "chars": 0,
               "duplicates": 0, "short": 0}
        for _, text in package_documents(pkg, deb):
            if len(text) < pkg.min_chars:
                row["short"] += 1
                continue
            key = normalised_hash(text)
            if key in docs:
                row["duplicates"] += 1
                continue
            docs[key] = text
            row["documents"] += 1
            row["chars"] += len(text)
        if stats is not None:
            stats[pkg.name] = row
    for key in sorted(docs):
        yield docs[key]
