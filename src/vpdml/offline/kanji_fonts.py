"""The fonts of the kanji benchmark: pinned npm packages of Japanese Google Fonts, and reading them.

Each family is an ``@expo-google-fonts/<family>`` npm package pinned by version and by the sha256 of its
tarball, with the path of the one font file used (the Regular / 400 weight). ``vpdml.offline.kanji`` renders
the glyphs and builds the dataset.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from vpdml.offline.npm import (
    NpmPackage,
    OfflineDatasetError,
    ScopedNpmPackage,
    fetch_npm_package,
    read_tar_members,
)

# The CJK Unified Ideographs block; its extensions are rare characters few fonts draw.
KANJI_FIRST, KANJI_LAST = 0x4E00, 0x9FFF


@dataclass(frozen=True)
class KanjiFont:
    """One typeface: its pinned npm package, the font file inside it, and a word for its design."""

    key: str
    package: NpmPackage
    member: str
    style: str


def _expo_font(key: str, version: str, sha256: str, member: str, license: str, style: str) -> KanjiFont:
    package = ScopedNpmPackage(f"@expo-google-fonts/{key}", version, sha256, license)
    return KanjiFont(key, package, f"package/{member}", style)


# Families with broad kanji coverage and visibly different designs. Left out, because their kanji are (near)
# copies of a kept family's at 64 px: yuji-mai (pixel-identical to yuji-syuku), m-plus-rounded-1c, kosugi,
# zen-kaku-gothic-new and shippori-mincho (mean difference 11-19 levels from m-plus-1p, kosugi-maru,
# zen-maru-gothic and noto-serif-jp; distinct kept families differ by 29 or more).
# fmt: off
KANJI_FONTS: tuple[KanjiFont, ...] = tuple(
    _expo_font(*row)
    for row in (
        # key, version, sha256 of the npm tarball, font file in package/, license of the font, design
        ("biz-udgothic", "0.4.0", "29bad69cc7094ac4adcba3af21b903b18e85e6829a521f42591ade9891f0b99d", "400Regular/BIZUDGothic_400Regular.ttf", "OFL-1.1", "gothic"),
        ("biz-udmincho", "0.4.0", "8b3ec2848ef9ccb0ec4dbbad4747ebeacf6a1b643663f0276ce86d34f9a63929", "400Regular/BIZUDMincho_400Regular.ttf", "OFL-1.1", "mincho"),
        ("dela-gothic-one", "0.4.1", "872442c04c6eb9d1f1c4590ec41c1fa1fee9f3a8c8ac8dcbb8ff01299a10da37", "400Regular/DelaGothicOne_400Regular.ttf", "OFL-1.1", "display"),
        ("dotgothic16", "0.4.1", "a5843e3f6bdd032ad10e57e843f867b3eab17bd4fe3ab1521a5da6b81cb89535", "400Regular/DotGothic16_400Regular.ttf", "OFL-1.1", "pixel"),
        ("hachi-maru-pop", "0.4.1", "99072e0660153491c2b49cb4ac9d4c47c0015327374a3085a699ddf01e8ce6a8", "400Regular/HachiMaruPop_400Regular.ttf", "OFL-1.1", "pop"),
        ("hina-mincho", "0.4.1", "24a337006bca11233a50bccb8c38b8f1cc462f3c1e1aea0ec69840e930904540", "400Regular/HinaMincho_400Regular.ttf", "OFL-1.1", "mincho"),
        ("kaisei-decol", "0.4.1", "adffef42c315e9d13e29c0d4d2e562d3ee80f4db5fd023bfb5683cc5a433db7d", "400Regular/KaiseiDecol_400Regular.ttf", "OFL-1.1", "mincho"),
        ("kiwi-maru", "0.4.1", "1ff70c2fc981b535fdcb14124c3153eaa96d9530960ce4ae144fa9534688d054", "400Regular/KiwiMaru_400Regular.ttf", "OFL-1.1", "rounded"),
        ("klee-one", "0.4.1", "d6ccbe88e737bf2105e39f8a0f6449d1cf7a10889b52093fa9e7e9e18e346339", "400Regular/KleeOne_400Regular.ttf", "OFL-1.1", "handwritten"),
        ("kosugi-maru", "0.4.1", "ac4083940924f684dc877cd2e7739302903a46a9a44bd663766e45b417641d39", "400Regular/KosugiMaru_400Regular.ttf", "Apache-2.0", "rounded"),
        ("m-plus-1p", "0.4.2", "755452bb112100743022e749b3d98405e885985dead28dda65b5d1e6d7f61300", "400Regular/MPLUS1p_400Regular.ttf", "OFL-1.1", "gothic"),
        ("mochiy-pop-one", "0.4.1", "9a902a2d8b9ae330c14516bcc643ad3879d9be0e0c89fa854cc2f2cd6daab363", "400Regular/MochiyPopOne_400Regular.ttf", "OFL-1.1", "pop"),
        ("noto-sans-jp", "0.4.3", "563ee80509692e2b2f42ceae6a0b82afecb90daa1b3d025bcebdf3d9120f43a3", "400Regular/NotoSansJP_400Regular.ttf", "OFL-1.1", "gothic"),
        ("noto-serif-jp", "0.4.3", "4805f4369a831140d0c1a5650e90296cff2641ff202da43ef5272edc2e0866ee", "400Regular/NotoSerifJP_400Regular.ttf", "OFL-1.1", "mincho"),
        ("potta-one", "0.4.1", "2de321f6ca672cd053c779cd74a7646e6ec479e2ef7bd1ccf621d8a8386f0663", "400Regular/PottaOne_400Regular.ttf", "OFL-1.1", "brush"),
        ("rampart-one", "0.4.1", "3c72841aa07ece15e68be7eb3deec56db8018b4f4fe31ebc74c22c00b8518417", "400Regular/RampartOne_400Regular.ttf", "OFL-1.1", "display"),
        ("reggae-one", "0.4.1", "172d33e4ae4e898318a4e12d6b799991d0c7cdde517e702266930d4a6a87ef08", "400Regular/ReggaeOne_400Regular.ttf", "OFL-1.1", "display"),
        ("rocknroll-one", "0.4.1", "e7f92524c0ca434770dcdabd093cb6f68253e64da814ac8c41ac9f236c267685", "400Regular/RocknRollOne_400Regular.ttf", "OFL-1.1", "pop"),
        ("sawarabi-gothic", "0.4.2", "3be62f39f94b869c34a31302c6f8eb782f11f804ac952aa54306bbc1fcefdf42", "400Regular/SawarabiGothic_400Regular.ttf", "OFL-1.1", "gothic"),
        ("sawarabi-mincho", "0.4.1", "74738a000bcd713e11884d6feab16de5b910a784d0d03940fb3d176d1318f5c4", "400Regular/SawarabiMincho_400Regular.ttf", "OFL-1.1", "mincho"),
        ("stick", "0.4.1", "913533f8a641a6d1d69bb0c16e8f0e21b6de5ffee2d6fb7764207221461be23c", "400Regular/Stick_400Regular.ttf", "OFL-1.1", "display"),
        ("train-one", "0.2.3", "c4c563ad86b45df187ec9344cdc2be042d189d5773621356b2e60a085bdcc3da", "TrainOne_400Regular.ttf", "OFL-1.1", "display"),
        ("yomogi", "0.4.1", "1ac5349db38e057643e9651634c58f7c4344e56bd99e0981287488e5c42a6c6d", "400Regular/Yomogi_400Regular.ttf", "OFL-1.1", "handwritten"),
        ("yuji-syuku", "0.4.1", "6b16771510936a4587ae13b2027689a7a317f18ea33463459253f497678d4146", "400Regular/YujiSyuku_400Regular.ttf", "OFL-1.1", "brush"),
        ("yusei-magic", "0.4.2", "7a685aab468de769919593cd33521d8c9c8512d1eaf45530ef524e5437944fea", "400Regular/YuseiMagic_400Regular.ttf", "OFL-1.1", "handwritten"),
        ("zen-kurenaido", "0.4.1", "6a175ed6181dd0fa313c8e8ac26db5e1802c567672108b65ce13ce6b11908a75", "400Regular/ZenKurenaido_400Regular.ttf", "OFL-1.1", "handwritten"),
        ("zen-maru-gothic", "0.4.1", "4511eb0b11847b3e4a7c9515271f65476f305458ebed04f55470bee92340cdb2", "400Regular/ZenMaruGothic_400Regular.ttf", "OFL-1.1", "rounded"),
        ("zen-old-mincho", "0.4.1", "3aeff57342523752d3020f66f50270288950c8e1796825cf2b5f32e943948a5a", "400Regular/ZenOldMincho_400Regular.ttf", "OFL-1.1", "mincho"),
    )
)
# fmt: on


class KanjiDatasetError(OfflineDatasetError):
    """The kanji dataset cannot be built (npm missing or failing, a bad tarball, an unreadable font)."""


# --------------------------------------------------------------------------------------------------
# The npm tarballs and the fonts in them
# --------------------------------------------------------------------------------------------------


def fetch_font_package(cache_dir: Path, font: KanjiFont) -> Path:
    """The font's pinned tarball under ``cache_dir/npm`` (``npm pack`` runs only when it is absent or altered)."""
    try:
        return fetch_npm_package(font.package, cache_dir)
    except OfflineDatasetError as error:  # npm missing or failing, or a checksum mismatch: said by the helper
        raise KanjiDatasetError(f"Cannot fetch the {font.key} font: {error}") from error


def read_font_file(tarball: Path, font: KanjiFont) -> bytes:
    """The bytes of the font's pinned file (``font.member``) in its tarball."""
    try:
        members = read_tar_members(tarball, lambda name: name == font.member)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise KanjiDatasetError(
            f"{tarball} is not a readable .tgz ({error}); delete it so that it is fetched again."
        ) from error
    if font.member not in members:
        raise KanjiDatasetError(
            f"{tarball.name} has no {font.member}: the package layout changed; pin the file's new path for "
            f"{font.key!r} in vpdml.offline.kanji_fonts.KANJI_FONTS."
        )
    return members[font.member]


@dataclass(frozen=True)
class FontFacts:
    """What the font file says about itself: the kanji it maps, and its name-table notices (for the record)."""

    kanji: frozenset[int]
    family: str
    version: str
    copyright: str
    license_url: str


def read_font_facts(data: bytes, key: str) -> FontFacts:
    """Parse the font's Unicode cmap (CJK Unified Ideographs only) and name table with fontTools."""
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(io.BytesIO(data), lazy=True)
        cmap = font.getBestCmap() or {}
        names = font["name"]
    except Exception as error:  # fontTools raises many kinds (TTLibError, struct.error, KeyError...)
        raise KanjiDatasetError(
            f"The {key} font file is not a readable TrueType/OpenType font ({error!r}); delete its tarball "
            "from the npm cache folder so that it is fetched again."
        ) from error

    def name(name_id: int) -> str:
        return names.getDebugName(name_id) or ""

    kanji = frozenset(point for point in cmap if KANJI_FIRST <= point <= KANJI_LAST)
    return FontFacts(kanji, name(1), name(5), name(0), name(14))
