"""Readers, license lookup and allow-lists of the Debian photo packages (no package is fetched)."""

from __future__ import annotations

import fnmatch
import io
import json
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image

from spa_viz.data import debian_photos as dp


def _rcc(files: dict[str, bytes], compress: frozenset[str] = frozenset(), version: int = 3) -> bytes:
    """A Qt resource bundle holding ``files`` (paths with folders), some zlib-compressed."""
    tree: dict = {}
    for path in files:
        node = tree
        *folders, name = path.split("/")
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = path
    # breadth-first, as rcc lays them out: a directory's children are consecutive nodes
    entries: list[tuple[str, object]] = [("", tree)]
    names, blobs, table = bytearray(), bytearray(), bytearray()
    node_size = 14 if version == 1 else 22
    position = 0
    while position < len(entries):
        name, value = entries[position]
        name_offset = len(names)
        names.extend(struct.pack(">HI", len(name), 0) + name.encode("utf-16-be"))
        if isinstance(value, dict):
            table.extend(struct.pack(">IHII", name_offset, 2, len(value), len(entries)))
            entries.extend(sorted(value.items()))
        else:
            data, flags = files[value], 0
            if value in compress:
                data, flags = struct.pack(">I", len(data)) + zlib.compress(data), 1
            table.extend(struct.pack(">IHHHI", name_offset, flags, 0, 0, len(blobs)))
            blobs.extend(struct.pack(">I", len(data)) + data)
        table.extend(bytes(node_size - 14))
        position += 1
    header = 24 if version >= 3 else 20
    head = b"qres" + struct.pack(">IIII", version, header, header + len(table), header + len(table) + len(blobs))
    head += struct.pack(">I", 0) if version >= 3 else b""
    return bytes(head + table + blobs + names)


def test_read_qt_resources_round_trip() -> None:
    files = {
        "gcompris/a/README": b"Copyright: me\nLicense: CC0-1.0\nFiles: x.webp",
        "gcompris/a/x.webp": b"pixels" * 50,
        "gcompris/b.txt": b"plain",
    }
    for version in (1, 3):
        data = _rcc(files, compress=frozenset({"gcompris/a/x.webp"}), version=version)
        assert dp.read_qt_resources(data) == files
    with pytest.raises(ValueError, match="qres"):
        dp.read_qt_resources(b"nope" + bytes(20))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _puzzle(photo: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    texture = Image.new("RGB", (256, 256), (0, 0, 0))
    texture.paste(photo, box[:2])
    mask = io.BytesIO()
    Image.new("RGBA", (256, 256)).save(mask, "PNG")
    entries = [
        ("p.map", f"#texture map data\ncrop000 0 0 10 10\nimage {box[0]} {box[1]} {box[2]} {box[3]} 1 1\n".encode()),
        ("p-t.jpg", _jpeg(photo.resize((20, 20)))),
        ("p.png", mask.getvalue()),
        ("p.jpg", _jpeg(texture)),
    ]
    body = b"PzlF\n0.1\np\nhttp://example.org/\n"
    for name, data in entries:
        body += f"{name}\n{len(data)}\n".encode() + data + b"\n"
    return body


def test_read_jigzo_puzzle_crops_the_photo_rectangle() -> None:
    photo = Image.fromarray(
        np.kron(np.array([[40, 200], [120, 80]], dtype=np.uint8), np.ones((60, 50), np.uint8))
    ).convert("RGB")
    image = dp.read_jigzo_puzzle(_puzzle(photo, (10, 20, 100, 120)))
    assert image.size == (100, 120)
    got = np.asarray(image, dtype=float)[5:55:10, 5:45:10]  # inside the top-left block, away from edges
    assert np.abs(got - 40).max() < 8
    with pytest.raises(ValueError, match="PzlF"):
        dp.read_jigzo_puzzle(b"JPEG")


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: someone
License: GPL-2+

Files: nature/*.jpg
Copyright: photographer
License: CC-BY-SA-3.0

Files: nature/Dune.jpg
 nature/Wood.jpg
Copyright: other
License: CC0-1.0
 Long text of the license.

License: GPL-2+
 Text.
"""


def test_copyright_license_last_matching_paragraph_wins() -> None:
    entries = dp.parse_copyright(COPYRIGHT)
    assert [e.license for e in entries] == ["GPL-2+", "CC-BY-SA-3.0", "CC0-1.0"]
    assert dp.copyright_license(entries, "usr/share/backgrounds/mate/nature/Wood.jpg") == ("CC0-1.0", "file entry")
    assert dp.copyright_license(entries, "usr/share/backgrounds/mate/nature/Aqua.jpg") == ("CC-BY-SA-3.0", "file entry")
    assert dp.copyright_license(entries, "usr/share/other/x.png") == ("GPL-2+", "package default")
    # installed files may change extension (GCompris ships .jpg sources as .webp)
    assert dp.copyright_license(entries, "bundle.rcc!src/nature/Dune.webp") == ("CC0-1.0", "file entry")
    assert dp.copyright_license([], "x.png") == ("unknown", "not found")


README = """Copyright: A, 2020
License: CC-BY-SA 4.0
Files:
key.svg
egypt/egypt.svg

Copyright: B
Source: https://commons.wikimedia.org/wiki/File:One.jpg
License: CC0-1.0
Files: one.webp

Copyright: C
License: GPLv3
Files:
  braille.webp
  chart.webp
Comment: braille.webp is based on a photo by D, original source at https://example.org/braille.jpg

Copyright: E
License: CC-BY-SA 4.0
castle_0.webp
castle_background.webp
Comment: based on a photo by F, source at https://example.org/castle.jpg.
"""


def test_readme_provenance() -> None:
    info = dp.readme_provenance(README)
    assert info["one.webp"] == {
        "copyright": "B",
        "license": "CC0-1.0",
        "source": "https://commons.wikimedia.org/wiki/File:One.jpg",
    }
    assert info["egypt/egypt.svg"]["license"] == "CC-BY-SA 4.0" and info["egypt/egypt.svg"]["source"] == ""
    assert info["braille.webp"]["source"] == "https://example.org/braille.jpg"
    assert info["chart.webp"]["source"] == ""  # the comment names braille.webp only
    assert (
        info["castle_0.webp"]["source"] == info["castle_background.webp"]["source"] == "https://example.org/castle.jpg"
    )
    assert info["castle_background.webp"]["license"] == "CC-BY-SA 4.0"


def test_package_rule_validation_and_matching() -> None:
    with pytest.raises(ValueError, match="role"):
        dp.PackageRule(role="training", container="files", include=("*",))
    with pytest.raises(ValueError, match="container"):
        dp.PackageRule(role="pool", container="zip", include=("*",))
    rule = dp.PACKAGE_RULES["tuxpaint-stamps-default"]
    stamps = "usr/share/tuxpaint/stamps/"
    assert rule.allows(stamps + "animals/birds/owl.png")
    assert not rule.allows(stamps + "animals/insects/bee.png")  # a drawing
    assert not rule.allows(stamps + "household/tools/measuring_tape_mirror.png")  # a mirrored copy
    assert not rule.allows(stamps + "animals/mammals/cartoon/cat.png")
    assert not rule.allows(stamps + "space/planets/3_earth.png")  # a render


def test_second_check_sources_are_held_out_from_training() -> None:
    """The second check's backgrounds and objects come from packages that give no training photo."""
    for pattern in dp.SECOND_CHECK_BACKGROUNDS:
        package, path = pattern.split(":", 1)
        rule = dp.PACKAGE_RULES[package]
        assert rule.role == "held_out"
        assert any(fnmatch.fnmatchcase(path, include) or include == path for include in rule.include)
    roles = {rule.role for rule in dp.PACKAGE_RULES.values()}
    assert roles == set(dp.ROLES)
    assert not set(dp.INSPECTED_UNUSED) & set(dp.PACKAGE_RULES)


def _fake_package(tmp_path, name: str, files: dict[str, bytes], copyright: str) -> dp.FetchedPackage:
    root = tmp_path / name
    for path, data in {**files, f"usr/share/doc/{name}/copyright": copyright.encode()}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return dp.FetchedPackage(name, "1.0-1", f"{name}_1.0-1_all.deb", 1, "0" * 64, root)


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def test_iter_members_files_and_bundles(tmp_path) -> None:
    mate = _fake_package(
        tmp_path,
        "mate-backgrounds",
        {
            "usr/share/backgrounds/mate/nature/Wood.jpg": _png((1, 2, 3)),
            "usr/share/backgrounds/mate/abstract/Silk.png": _png((4, 5, 6)),
        },
        COPYRIGHT,
    )
    members = list(dp.iter_members(mate))
    assert [m.path for m in members] == ["usr/share/backgrounds/mate/nature/Wood.jpg"]
    assert members[0].license == "CC0-1.0" and members[0].role == "held_out"
    assert members[0].id == "mate-backgrounds:usr/share/backgrounds/mate/nature/Wood.jpg"
    assert members[0].load().getpixel((0, 0)) == (1, 2, 3)

    bundle = _rcc(
        {
            "gcompris/src/activities/erase/resource/README": b"Copyright: B\nLicense: CC0-1.0\nSource: https://x.org/a.jpg\nFiles: alpaca.webp\n",
            "gcompris/src/activities/erase/resource/alpaca.webp": _png((9, 9, 9)),
            "gcompris/src/activities/erase/resource/square.svg": b"<svg/>",
        }
    )
    gcompris = _fake_package(tmp_path, "gcompris-qt-data", {"usr/share/gcompris-qt/rcc/erase.rcc": bundle}, COPYRIGHT)
    (member,) = dp.iter_members(gcompris)
    assert member.path == "usr/share/gcompris-qt/rcc/erase.rcc!gcompris/src/activities/erase/resource/alpaca.webp"
    assert (member.license, member.license_origin, member.source_url, member.author) == (
        "CC0-1.0",
        "resource README",
        "https://x.org/a.jpg",
        "B",
    )
    assert member.load().getpixel((0, 0)) == (9, 9, 9)


def test_fetch_package_reuses_the_unpacked_tree(tmp_path, monkeypatch) -> None:
    tree = tmp_path / "trees" / "jigzo-data"
    tree.mkdir(parents=True)
    record = {"name": "jigzo-data", "version": "0.6.1-7.1", "deb_file": "j.deb", "deb_size": 3, "deb_sha256": "ab"}
    (tree / ".spa_viz_unpacked.json").write_text(json.dumps(record))

    def no_commands(*args, **kwargs):
        raise AssertionError("a cached package must not run apt or dpkg")

    monkeypatch.setattr(subprocess, "run", no_commands)
    fetched = dp.fetch_package("jigzo-data", tmp_path)
    assert fetched.version == "0.6.1-7.1" and fetched.root == tree
    with pytest.raises(ValueError, match="unknown package"):
        dp.fetch_package("ubuntu-wallpapers", tmp_path)


def test_fetch_package_without_apt_says_so(tmp_path, monkeypatch) -> None:
    def missing(*args, **kwargs):
        raise FileNotFoundError("apt-get")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(RuntimeError, match="needs a Debian system"):
        dp.fetch_package("jigzo-data", tmp_path)
