"""Real photos from Debian image packages, fetched at data-preparation time (never at run time).

Why: the real-photo model needs far more than the ~27 photos Python packages ship. Debian's
wallpaper, game and education packages hold a few hundred real photographs with known licenses.
They are fetched by ``apt-get download PKG`` and unpacked by ``dpkg -x`` (nothing is installed)
into the git-ignored cache, once, by ``python -m spa_viz.data.photo_corpus prepare``.

What is kept is decided by :data:`PACKAGE_RULES`: one reviewable allow-list of member paths per
package (written after looking at every image each package ships), then the size and flat-colour
checks of :func:`spa_viz.data.photo_corpus.photo_rejection`. Packages that were inspected and hold
no photographs are listed in :data:`INSPECTED_UNUSED` and never fetched.

Three containers occur: plain files, Qt resource bundles (``.rcc``, GCompris) and jigzo puzzle
files (``.pzl``); :func:`read_qt_resources` and :func:`read_jigzo_puzzle` read the last two.
Licenses come from the package's DEP-5 ``copyright`` file (:func:`copyright_license`) or, for
GCompris, from the per-folder ``README`` inside the bundle (:func:`readme_provenance`), which names
author, license and original URL of every photo.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

__all__ = [
    "INSPECTED_UNUSED",
    "PACKAGE_RULES",
    "ROLES",
    "SECOND_CHECK_BACKGROUNDS",
    "CopyrightEntry",
    "FetchedPackage",
    "Member",
    "PackageRule",
    "copyright_license",
    "fetch_package",
    "iter_members",
    "parse_copyright",
    "read_jigzo_puzzle",
    "read_qt_resources",
    "readme_provenance",
]

log = logging.getLogger(__name__)

#: What a package's photos are used for. ``pool``: split by source photo into train / val / test;
#: ``held_out``: never trained on (test photos, and the second check's backgrounds);
#: ``objects``: photographed objects with exact alpha masks, used only by the second check.
ROLES = ("pool", "held_out", "objects")

#: Member path separator between a bundle file and the path inside it.
INNER = "!"


@dataclass(frozen=True)
class PackageRule:
    """Which members of one Debian package are real photographs, and what they are used for."""

    role: str
    container: str  # "files", "qt_rcc" or "jigzo"
    include: tuple[str, ...]  # fnmatch patterns on the member path (``*`` also matches ``/``)
    exclude: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.container not in ("files", "qt_rcc", "jigzo"):
            raise ValueError(f"container must be 'files', 'qt_rcc' or 'jigzo', got {self.container!r}")

    def allows(self, member: str) -> bool:
        """Whether ``member`` matches an include pattern and no exclude pattern."""
        return any(fnmatch.fnmatchcase(member, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(member, p) for p in self.exclude
        )


_RCC = "usr/share/gcompris-qt/rcc/"
#: GCompris "details" backgrounds that are photographs (the others are paintings).
_DETAILS_PHOTOS = (
    "Chenonceau",
    "EgeskovSlotSpejling",
    "EilanDonanCastle",
    "FanoeWindmill",
    "GizahPyramids",
    "Louvre_2007_02_24_c",
    "NDP",
    "Nagoya",
    "Neuschwanstein",
    "OperaSidney",
    "TajMahal",
    "TourEiffel",
    "TowerBridgeLondon",
)
_PLASMA = "usr/share/wallpapers/{}/contents/images/*"
#: Plasma wallpapers that are photographs (the other 19 are renders or drawings).
_PLASMA_PHOTOS = (
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
)
_STAMPS = "usr/share/tuxpaint/stamps/"

PACKAGE_RULES: dict[str, PackageRule] = {
    "gcompris-qt-data": PackageRule(
        role="pool",
        container="qt_rcc",
        include=(
            f"{_RCC}erase.rcc!*/erase/resource/*.webp",
            f"{_RCC}explore_world_animals.rcc!*/resource/animals/*.webp",
            f"{_RCC}explore_farm_animals.rcc!*/resource/animals/*.webp",
            f"{_RCC}explore_world_music.rcc!*/resource/music/*.webp",
            f"{_RCC}explore_monuments.rcc!*/explore_monuments/resource/*/*.webp",
            *(
                f"{_RCC}categorization.rcc!*/categorization/resource/images/{folder}/*.webp"
                for folder in ("fishes", "monuments", "others", "renewable", "tools")
            ),
            *(f"{_RCC}details.rcc!*/details/resource/image/{name}_background.webp" for name in _DETAILS_PHOTOS),
            f"{_RCC}clickgame.rcc!*/clickgame/resource/sea?.webp",
            *(
                f"{_RCC}louis-braille.rcc!*/louis-braille/resource/{name}.webp"
                for name in ("braille", "fireplace", "rnib", "statue", "teach", "workshop")
            ),
        ),
        note="Photos of the erase, explore_*, categorization (not the letter/number blocks), details "
        "(photo backgrounds, not paintings), clickgame (sea floor) and louis-braille activities. "
        "Left out: drawings (lang, clickgame fish, babymatch ...), paintings, planet renders, and the "
        "few photo cut-outs (leftright hands, babyshapes dog) since this package also feeds training.",
    ),
    "jigzo-data": PackageRule(
        role="pool",
        container="jigzo",
        include=("usr/share/games/jigzo/puzzles/*/*.pzl",),
        note="The 12 puzzle photos (the full-size JPEG inside each .pzl, cropped to its image rectangle).",
    ),
    "plasma-workspace-wallpapers": PackageRule(
        role="held_out",
        container="files",
        include=tuple(_PLASMA.format(name) for name in _PLASMA_PHOTOS),
        note="The 11 photographic wallpapers, each shipped at up to 12 resolutions (de-duplicated).",
    ),
    "mate-backgrounds": PackageRule(
        role="held_out",
        container="files",
        include=("usr/share/backgrounds/mate/nature/*.jpg",),
        note="The 12 nature photos; the abstract and desktop folders hold renders and logos.",
    ),
    "tuxpaint-stamps-default": PackageRule(
        role="objects",
        container="files",
        include=tuple(
            _STAMPS + p
            for p in (
                "animals/amphibians/*.png",
                "animals/birds/*.png",
                "animals/insects/*.png",
                "animals/lizards/*.png",
                "animals/mammals/*.png",
                "animals/marsupials/*.png",
                "animals/shellfish/*.png",
                "animals/fish/lionfish.png",
                "animals/fish/seahorse.png",
                "animals/fish/lobster.png",
                "food/fruit/*.png",
                "food/nuts/*.png",
                "food/spices/*.png",
                "food/vegetables/*.png",
                "hobbies/*.png",
                "household/*.png",
                "medical/*.png",
                "military/ammunition/*.png",
                "military/final-roll-call.png",
                "military/fireman240a.png",
                "military/vehicles/bradley.png",
                "military/vehicles/f22_raptor.png",
                "military/vehicles/infantry-stryker.png",
                "people/fireman*.png",
                "people/toys/*.png",
                "plants/*.png",
                "space/moon/*.png",
                "space/apollo_lander.png",
                "space/spacewalk.png",
                "sports/*.png",
                "town/uk_post_box.png",
                "town/usps_mailbox.png",
                "town/monuments/inukshuk-photo.png",
                "vehicles/auto/*.png",
                "vehicles/construction/*.png",
                "vehicles/cycle/*.png",
                "vehicles/emergency/firetruck.png",
                "vehicles/flight/planes/*.png",
                "vehicles/masstransit/*.png",
                "vehicles/race/*.png",
                "vehicles/garbagetruck.png",
                "vehicles/wheel_tractor.png",
                "clothes/clothespin_*.png",
            )
        ),
        exclude=tuple(
            "*" + p
            for p in (
                "/cartoon/*",
                "_mirror.png",
                "/animals/insects/bee.png",
                "/animals/mammals/echidna.png",
                "/animals/mammals/hedgehog.png",
                "/household/dishes/glass.png",
                "/medical/tooth.png",
                "/plants/trees/holly_leaves.png",
                "/plants/flowers/plastic/*",
                "/sports/rugby_goal_posts.png",
            )
        ),
        note="Photographed objects cut out with an exact alpha channel (stamps); drawings, cartoons, "
        "renders (planets, balloon, ships), mirrored copies and natural forces left out.",
    ),
}

#: Packages looked at and not used, with the reason (they are never fetched by the preparation).
INSPECTED_UNUSED: dict[str, str] = {
    "ukui-wallpapers": "12 wallpapers, all renders or vector-style art, no photographs",
    "lomiri-wallpapers": "one rendered wallpaper (warty-final-ubuntu.png), no photographs",
    "desktop-base": "Debian themes: SVG art, logos, plymouth sprites, no photographs",
}

#: Held-out photos that make the second check's backgrounds: scenes without one dominant object,
#: so the pasted object is what stands out. The other held-out photos go to the test split.
SECOND_CHECK_BACKGROUNDS: tuple[str, ...] = (
    *(
        f"plasma-workspace-wallpapers:{_PLASMA.format(name)}"
        for name in ("BytheWater", "ColdRipple", "DarkestHour", "Grey", "OneStandsOut", "Path", "summer_1am")
    ),
    *(
        f"mate-backgrounds:usr/share/backgrounds/mate/nature/{name}.jpg"
        for name in ("Blinds", "Dune", "GreenMeadow", "RainDrops", "Storm", "Wood")
    ),
)


# --------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedPackage:
    """A downloaded and unpacked Debian package."""

    name: str
    version: str
    deb_file: str
    deb_size: int
    deb_sha256: str
    root: Path  # where ``dpkg -x`` unpacked it

    def record(self) -> dict[str, object]:
        """JSON-ready description (without the local path)."""
        return {k: v for k, v in asdict(self).items() if k != "root"}


_MARKER = ".spa_viz_unpacked.json"


def _run(command: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"{command[0]} is not available: the photo corpus needs a Debian system (apt, dpkg)") from e
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(name: str, directory: Path) -> FetchedPackage:
    """``apt-get download`` + ``dpkg -x`` package ``name`` under ``directory`` (once; reused after).

    The .deb is kept in ``directory/debs`` and unpacked into ``directory/trees/<name>``; a marker
    file written last makes an interrupted unpack start over. If the download fails, ``apt-get
    update`` runs once and the download is retried.
    """
    if name not in PACKAGE_RULES:
        raise ValueError(f"unknown package {name!r}; the corpus uses only {sorted(PACKAGE_RULES)}")
    tree = directory / "trees" / name
    marker = tree / _MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        return FetchedPackage(**record, root=tree)
    debs = directory / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        log.info("apt-get download %s", name)
        try:
            _run(["apt-get", "download", name], debs)
        except RuntimeError:
            log.warning("apt-get download %s failed; running apt-get update once and retrying", name)
            _run(["apt-get", "update"], debs)
            _run(["apt-get", "download", name], debs)
        found = sorted(debs.glob(f"{name}_*.deb"))
    if len(found) != 1:
        raise RuntimeError(
            f"expected one {name}_*.deb in {debs}, found {[p.name for p in found]}; remove the extra ones"
        )
    deb = found[0]
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], debs).strip()
    if tree.exists():
        shutil.rmtree(tree)
    tree.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=tree.parent, prefix=f".{name}."))
    try:
        _run(["dpkg", "-x", str(deb), str(staging)], debs)
        staging.rename(tree)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    fetched = FetchedPackage(name, version, deb.name, deb.stat().st_size, _sha256_file(deb), tree)
    marker.write_text(json.dumps(fetched.record(), indent=2) + "\n")
    return fetched


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


def read_qt_resources(data: bytes) -> dict[str, bytes]:
    """Every file in a Qt binary resource bundle (``rcc``, format 1-3) as ``{path: bytes}``.

    Layout: magic ``qres``, version, offsets of the node tree, the data and the names. A node is
    (name offset u32, flags u16, then child count + first child for a directory, or country,
    language and data offset for a file), plus a u64 modification time from version 2 on. Flag 1
    marks zlib data (a u32 length, then the stream); zstd (flag 4) is not supported.
    """
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource bundle (no 'qres' magic)")
    version, tree, blobs, names = struct.unpack(">IIII", data[4:20])
    if version not in (1, 2, 3):
        raise ValueError(f"unsupported Qt resource format version {version}")
    node_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", data[names + offset : names + offset + 2])
        start = names + offset + 6  # u16 length, u32 hash, then UTF-16BE characters
        return data[start : start + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}
    pending = [(0, "")]
    while pending:
        index, prefix = pending.pop()
        node = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", data[node : node + 6])
        path = prefix + (name_at(name_offset) if index else "")
        if flags & 2:
            count, first = struct.unpack(">II", data[node + 6 : node + 14])
            pending.extend((child, path + "/") for child in range(first, first + count))
            continue
        (offset,) = struct.unpack(">I", data[node + 10 : node + 14])
        (size,) = struct.unpack(">I", data[blobs + offset : blobs + offset + 4])
        blob = data[blobs + offset + 4 : blobs + offset + 4 + size]
        if flags & 4:
            raise ValueError(f"{path}: zstd-compressed resources are not supported")
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        files[path.lstrip("/")] = blob
    return files


def read_jigzo_puzzle(data: bytes) -> Image.Image:
    """The photo of a jigzo ``.pzl`` puzzle: its full-size JPEG cropped to the ``image`` rectangle.

    A puzzle file is four header lines (``PzlF``, version, title, URL), then entries of
    ``name\\nsize\\n<size bytes>``: a texture map (text, holding ``image x y w h``), a thumbnail
    (``*-t.jpg``), the piece mask (``.png``) and the photo texture (``.jpg``).
    """
    if not data.startswith(b"PzlF\n"):
        raise ValueError("not a jigzo puzzle (no 'PzlF' header)")
    position = 0
    for _ in range(4):
        position = data.index(b"\n", position) + 1
    entries: dict[str, bytes] = {}
    while position < len(data):
        end = data.index(b"\n", position)
        name = data[position:end].decode()
        size_end = data.index(b"\n", end + 1)
        size = int(data[end + 1 : size_end])
        entries[name] = data[size_end + 1 : size_end + 1 + size]
        position = size_end + 1 + size
        if data[position : position + 1] == b"\n":
            position += 1
    maps = [v for k, v in entries.items() if k.endswith(".map")]
    photos = [k for k in entries if k.endswith(".jpg") and not k.endswith("-t.jpg")]
    if len(maps) != 1 or len(photos) != 1:
        raise ValueError(f"unexpected puzzle entries {sorted(entries)}")
    rectangle = [line.split() for line in maps[0].decode().splitlines() if line.startswith("image ")]
    if not rectangle:
        raise ValueError("the puzzle's texture map has no 'image' line")
    x, y, w, h = (int(v) for v in rectangle[0][1:5])
    image = Image.open(io.BytesIO(entries[photos[0]]))
    return image.convert("RGB").crop((x, y, x + w, y + h))


# --------------------------------------------------------------------------------------------------
# Licenses
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyrightEntry:
    """One ``Files:`` paragraph of a DEP-5 copyright file."""

    patterns: tuple[str, ...]
    license: str
    copyright: str = ""


def parse_copyright(text: str) -> list[CopyrightEntry]:
    """The ``Files:`` paragraphs of a machine-readable (DEP-5) ``debian/copyright`` text, in order."""
    entries = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        key = None
        for line in paragraph.splitlines():
            match = re.match(r"^([A-Za-z][\w-]*):\s*(.*)$", line)
            if match and not line[0].isspace():
                key = match.group(1).lower()
                fields[key] = [match.group(2)]
            elif key is not None:
                fields[key].append(line.strip())
        if "files" in fields and "license" in fields:
            patterns = tuple(" ".join(fields["files"]).split())
            entries.append(
                CopyrightEntry(patterns, fields["license"][0].strip(), " ".join(fields.get("copyright", [])).strip())
            )
    return entries


def _stem(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path


def copyright_license(entries: list[CopyrightEntry], member: str) -> tuple[str, str]:
    """(license, origin) of ``member`` by DEP-5 rules: the last paragraph whose pattern matches wins.

    Patterns name paths of the source tree, not of the installed files, so a pattern matches when
    it matches the end of the member path; a match ignoring the file extension also counts
    (GCompris ships .jpg sources as .webp). ``origin`` is ``"file entry"`` or ``"package default"``
    (only ``Files: *`` matched) or ``"not found"``.
    """
    path = member.split(INNER)[-1]
    found: tuple[str, str] = ("unknown", "not found")
    for entry in entries:
        for pattern in entry.patterns:
            if pattern == "*":
                found = (entry.license, "package default")
                break
            if fnmatch.fnmatchcase(path, "*" + pattern.lstrip("/")) or fnmatch.fnmatchcase(
                _stem(path), "*" + _stem(pattern.lstrip("/"))
            ):
                found = (entry.license, "file entry")
                break
    return found


def readme_provenance(text: str) -> dict[str, dict[str, str]]:
    """Per file name: ``copyright``, ``license`` and ``source`` from a GCompris resource README.

    The README is blocks separated by blank lines, each with ``Copyright:``, ``License:``,
    ``Source:``, ``Comment(s):`` and ``Files:`` (names on the same line or the lines below; some
    blocks list bare file names without the ``Files:`` key). When a
    block has no ``Source:``, the first URL of its comment stands for it: for the files the comment
    names, or for all the block's files when it names none ("based on an original image ...").
    """
    keys = {"copyright", "license", "source", "comment", "comments", "files"}
    result: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        fields: dict[str, list[str]] = {}
        key = None
        for line in block.splitlines():
            match = re.match(r"^\s*([A-Za-z]+):\s*(.*)$", line)
            if match and match.group(1).lower() in keys:
                key = match.group(1).lower()
                fields.setdefault(key, []).append(match.group(2).strip())
            elif re.fullmatch(r"[\w./*-]+\.\w+", line.strip()):  # a bare file name, even without "Files:"
                fields.setdefault("files", []).append(line.strip())
            elif key is not None and line.strip():
                fields[key].append(line.strip())
        if "files" not in fields:
            continue
        comment = " ".join(fields.get("comment", []) + fields.get("comments", []))
        urls = re.findall(r"https?://\S+", comment)
        names = " ".join(fields["files"]).split()
        source = " ".join(fields.get("source", [])).strip()
        named = [name for name in names if name in comment]
        for name in names:
            from_comment = urls[0].rstrip(".,;)") if urls and (not named or name in named) else ""
            result[name] = {
                "copyright": " ".join(fields.get("copyright", [])).strip(),
                "license": " ".join(fields.get("license", [])).strip(),
                "source": source or from_comment,
            }
    return result


# --------------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------------


@dataclass
class Member:
    """One allowed image of a package, with its provenance and a loader."""

    package: str
    version: str
    path: str  # inside the package; ``bundle!inner`` for a file inside an .rcc bundle
    role: str
    license: str
    license_origin: str
    source_url: str = ""
    author: str = ""
    load: Callable[[], Image.Image] = field(default=lambda: Image.new("RGB", (1, 1)), repr=False)

    @property
    def id(self) -> str:
        return f"{self.package}:{self.path}"


def _copyright_entries(package: FetchedPackage) -> list[CopyrightEntry]:
    path = package.root / "usr" / "share" / "doc" / package.name / "copyright"
    return parse_copyright(path.read_text(errors="replace")) if path.is_file() else []


def _open_bytes(data: bytes) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(data))


def _bundle_provenance(bundle: dict[str, bytes], inner: str) -> dict[str, str] | None:
    """The README entry of ``inner``: from the README of its folder or the nearest folder above
    that names it (READMEs name files relative to their own folder)."""
    parts = inner.split("/")
    for depth in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:depth])
        readme = bundle.get(f"{folder}/README") or bundle.get(f"{folder}/readme")
        if readme:
            info = readme_provenance(readme.decode(errors="replace")).get("/".join(parts[depth:]))
            if info:
                return info
    return None


def iter_members(package: FetchedPackage) -> Iterator[Member]:
    """Every member of ``package`` that its :data:`PACKAGE_RULES` entry allows, in path order."""
    rule = PACKAGE_RULES[package.name]
    entries = _copyright_entries(package)
    files = sorted(p for p in package.root.rglob("*") if p.is_file() and p.name != _MARKER)
    for file in files:
        relative = file.relative_to(package.root).as_posix()
        if rule.container == "qt_rcc":
            if not any(fnmatch.fnmatchcase(relative, p.split(INNER)[0]) for p in rule.include):
                continue
            bundle = read_qt_resources(file.read_bytes())
            for inner in sorted(bundle):
                member = f"{relative}{INNER}{inner}"
                if not rule.allows(member):
                    continue
                info = _bundle_provenance(bundle, inner)
                if info and info["license"]:
                    license, origin = info["license"], "resource README"
                else:
                    license, origin = copyright_license(entries, member)
                yield Member(
                    package.name,
                    package.version,
                    member,
                    rule.role,
                    license,
                    origin,
                    source_url=info["source"] if info else "",
                    author=info["copyright"] if info else "",
                    load=_open_bytes(bundle[inner]),
                )
        elif rule.allows(relative):
            license, origin = copyright_license(entries, relative)
            if rule.container == "jigzo":
                load = (lambda data: lambda: read_jigzo_puzzle(data))(file.read_bytes())
            else:
                load = (lambda path: lambda: Image.open(path))(file)
            yield Member(package.name, package.version, relative, rule.role, license, origin, load=load)
