"""The debian-docs corpus source on hand-made packages: .deb reading, each format's conversion, deduplication, the
fixed document order, checksum and availability errors that name the package, and `prep` end to end with a test
split and the manifest recorded in meta.json."""

import hashlib
import io
import struct
import tarfile
import zlib

import pytest

from nanogrow.data_prep import debian
from nanogrow.data_prep.debian import CorpusError

PROSE = "The quick brown fox jumps over the lazy dog, and then it rests for a while in the warm afternoon sun. " * 3


def make_deb(path, files: dict[str, bytes]) -> None:
    """A minimal Debian package: an ar archive of debian-binary, control.tar.gz and data.tar.xz."""
    def tar(members: dict[str, bytes], mode: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in [("debian-binary", b"2.0\n"), ("control.tar.gz", tar({"control": b"Package: x\n"}, "w:gz")),
                       ("data.tar.xz", tar(files, "w:xz"))]:
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.write(data + (b"\n" if len(data) % 2 else b""))
    path.write_bytes(out.getvalue())


def sword_files(verses: list[str]) -> dict[str, bytes]:
    """A zText module: every verse in one compressed block, 10-byte verse entries."""
    block = "".join(verses).encode()
    comp = zlib.compress(block)
    entries, off = b"", 0
    for v in verses:
        entries += struct.pack("<IIH", 0, off, len(v.encode()))
        off += len(v.encode())
    root = "usr/share/sword/modules/texts/ztext/tiny"
    return {"usr/share/sword/mods.d/tiny.conf": b"[Tiny]\nDataPath=./modules/texts/ztext/tiny/\nModDrv=zText\n",
            f"{root}/nt.bzs": struct.pack("<III", 0, len(comp), len(block)), f"{root}/nt.bzz": comp,
            f"{root}/nt.bzv": entries}


PACKAGES = {
    "doc-html": ("1.0-1", "html", [r"^usr/share/doc/x/.*\.html$"], {
        "usr/share/doc/x/a.html": f"<html><body class='sidebar-visible'><div class='sidebar'>MENU</div>"
                                  f"<h1>Title</h1><p>{PROSE}</p><script>var x;</script></body></html>".encode(),
        "usr/share/doc/x/b.html": f"<h1>TITLE</h1><p>{PROSE.upper()}</p>".encode(),  # a's text up to case: a duplicate
        "usr/share/doc/x/index.html": b"<p>short</p>",  # under min_chars
        "usr/share/doc/x/style.css": b"body{}",  # not matched
    }),
    "doc-rst": ("2:3.1-2", "rst", [r"\.txt$"], {
        "usr/share/doc/y/_sources/z.txt":
            f"Heading\n=======\n\nUse :func:`open` here. {PROSE}\n\n.. note::\n".encode()}),
    "fortune-x": ("1", "fortune", [r"games/"], {
        "usr/share/games/fortunes/f": f"{PROSE}\n%\n{PROSE[:150]} Second saying.\n%\n".encode()}),
    "sword-x": ("1", "sword", [r"mods\.d/"], sword_files([f"<w>In the beginning</w> {PROSE}", f"Verse two. {PROSE}"])),
}


def literal_list(patterns: list[str]) -> str:
    return ", ".join("'" + p + "'" for p in patterns)  # TOML literal strings: backslashes stay as written


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    lines = ["[corpus]\nname = \"tiny\"\n"]
    for name, (version, fmt, files, content) in PACKAGES.items():
        deb = cache / f"{name}_{version.replace(':', '%3a')}.deb"
        make_deb(deb, content)
        sha = hashlib.sha256(deb.read_bytes()).hexdigest()
        lines.append(f"[[package]]\nname = \"{name}\"\nversion = \"{version}\"\nsha256 = \"{sha}\"\nlicense = \"MIT\"\n"
                     f"format = \"{fmt}\"\nfiles = [{literal_list(files)}]\n")
    manifest = tmp_path / "manifest.toml"
    manifest.write_text("\n".join(lines))
    monkeypatch.setenv("NANOGROW_DEB_CACHE", str(cache))
    monkeypatch.setattr(debian, "MANIFEST", manifest)
    return manifest, cache


def test_documents_are_converted_deduplicated_and_in_hash_order(corpus):
    stats = {}
    docs = list(debian.iter_debian_docs(stats=stats))
    row = stats["doc-html"]
    assert (row["version"], row["documents"], row["duplicates"], row["short"]) == ("1.0-1", 1, 1, 1)
    html = next(d for d in docs if d.startswith("Title"))
    assert "MENU" not in html and "var x" not in html and PROSE.strip() in html
    rst = next(d for d in docs if d.startswith("Heading"))
    assert "Use open here." in rst and ":func:" not in rst and ".. note" not in rst and "=====" not in rst
    assert stats["fortune-x"]["documents"] == 1 and stats["fortune-x"]["short"] == 1  # the second is < 200 chars
    sword = next(d for d in docs if d.startswith("In the beginning"))
    assert "<w>" not in sword and sword.count("\n") == 1  # two verses, one per line
    assert docs == [d for _, d in sorted((debian.normalised_hash(d), d) for d in docs)]
    assert docs == list(debian.iter_debian_docs())  # the same documents in the same order, every time


def test_a_changed_package_is_refused_by_name(corpus):
    _, cache = corpus
    deb = cache / "doc-rst_2%3a3.1-2.deb"
    deb.write_bytes(deb.read_bytes() + b"x")
    with pytest.raises(CorpusError, match=r"doc-rst=2:3\.1-2: .* has sha256 .* the manifest says"):
        next(debian.iter_debian_docs())


def test_a_missing_package_without_apt_names_package_and_cache(corpus, monkeypatch):
    _, cache = corpus
    (cache / "fortune-x_1.deb").unlink()
    monkeypatch.setattr(debian.shutil, "which", lambda _: None)
    with pytest.raises(CorpusError, match=r"package fortune-x=1: not in .* no apt-get here"):
        next(debian.iter_debian_docs())


def test_a_superseded_package_is_named_and_latest_is_taken_only_when_asked(corpus, monkeypatch, tmp_path):
    _, cache = corpus
    (cache / "fortune-x_1.deb").unlink()
    fake = tmp_path / "bin"
    fake.mkdir()
    apt = fake / "apt-get"  # an apt-get whose archive has moved on: only the current fortune-x exists
    apt.write_text(f"#!/bin/sh\n[ \"$2\" = fortune-x ] || {{ echo 'E: Version 1 not found' >&2; exit 100; }}\n"
                   f"cp {cache}/doc-html_1.0-1.deb ./fortune-x_2_all.deb\n")
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    with pytest.raises(CorpusError, match=r"fortune-x=1: apt-get download failed \(E: Version 1 not found\).*"
                                          r"NANOGROW_DEB_LATEST=1"):
        next(debian.iter_debian_docs())
    monkeypatch.setenv("NANOGROW_DEB_LATEST", "1")
    stats = {}
    list(debian.iter_debian_docs(stats=stats))
    assert stats["fortune-x"]["version"].startswith("latest") and len(stats["fortune-x"]["sha256"]) == 64


def test_bad_manifest_entries_are_named(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('[[package]]\nname = "p"\nversion = "1"\nsha256 = "00"\nlicense = "x"\nformat = "pdf"\nfiles = []\n')
    with pytest.raises(CorpusError, match="package p: format 'pdf'"):
        debian.load_manifest(bad)


def test_prep_builds_train_val_and_test_from_the_corpus(corpus, tmp_path):
    import json

    from nanogrow.data_prep.prepare import main

    out = tmp_path / "data"
    assert main(["--source", "debian-docs", "--tokenizer", "bpe:300", "--out", str(out), "--workers", "1",
                 "--val-tokens", "40", "--test-tokens", "40", "--val-every", "2"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["source"] == "debian-docs" and meta["source"]["manifest"] == "manifest.toml"
    assert meta["source"]["manifest_sha256"] == debian.sha256_of(corpus[0])
    assert meta["source"]["packages"]["sword-x"]["documents"] == 1
    assert meta["val"]["tokens"] == 40 and meta["test"]["tokens"] == 40 and meta["train"]["tokens"] > 100
    assert (out / "test_000000.bin").exists()
