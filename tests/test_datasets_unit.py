"""Dataset uploads: kohya folder names, hostile archives, reports, and the kohya-layout export.

Every archive here is built in the test with zipfile (and patched by hand where zipfile will
not write the hostile thing), so each refusal is shown with the smallest input that needs it.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import stat
import struct
import tomllib
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from services.gateway.datasets.export import ExportItem, export_zip
from services.gateway.datasets.ingest import IngestLimits, SubsetInfo, ingest
from services.gateway.datasets.kohya import SubsetName, parse_subset_dir
from services.gateway.datasets.report import ItemSummary, aspect_bucket, build_report
from shared.errors import ValidationFailed


def image_bytes(width: int, height: int, fmt: str = "PNG", *, seed: int = 0) -> bytes:
    """Noise, so no two test images share bytes and none compresses like a bomb."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(entries: list[tuple[str, bytes]], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def patch_headers(data: bytes, *, flag_bits: int | None = None, file_size: int | None = None) -> bytes:
    """Rewrite the first entry's local and central headers, as a hand-made archive would."""
    out = bytearray(data)
    local, central = out.find(b"PK\x03\x04"), out.find(b"PK\x01\x02")
    if flag_bits is not None:
        struct.pack_into("<H", out, local + 6, flag_bits)
        struct.pack_into("<H", out, central + 8, flag_bits)
    if file_size is not None:
        struct.pack_into("<I", out, local + 22, file_size)
        struct.pack_into("<I", out, central + 24, file_size)
    return bytes(out)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00"))
            + chunk(b"IEND", b""))


def refused(*, files: list[tuple[str, bytes]] | None = None, zips: list[tuple[str, bytes]] | None = None,
            limits: IngestLimits | None = None) -> tuple[str, int]:
    with pytest.raises(ValidationFailed) as info:
        ingest(files=files or [], zips=zips or [], limits=limits or IngestLimits())
    return info.value.errors[0]["field"], info.value.status


PNG = image_bytes(64, 64)


# --- subset names -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("10_sks dog", (10, "sks", "dog", False)),
    ("20_sls frog", (20, "sls", "frog", False)),
    ("3_ohwx 1girl solo", (3, "ohwx", "1girl solo", False)),
    ("1_dog", (1, None, "dog", True)),
    ("1_1girl", (1, None, "1girl", True)),
    ("reg/1_a dog", (1, None, "a dog", True)),  # the parent decides over the space
    ("reg_girls/1_1girl", (1, None, "1girl", True)),
    ("regularization/5_dog", (5, None, "dog", True)),
    ("img/10_ohwx", (10, "ohwx", None, False)),
    ("train_data/4_sks dog", (4, "sks", "dog", False)),
    ("train_girls/10_sls 1girl", (10, "sls", "1girl", False)),
    ("photos/1_dog", (1, None, "dog", True)),  # an unknown parent: back to the guess
    ("img\\10_sks dog", (10, "sks", "dog", False)),
])
def test_subset_names(name: str, expected: tuple[int, str | None, str | None, bool]) -> None:
    parsed = parse_subset_dir(name)
    assert parsed is not None
    assert (parsed.repeats, parsed.identifier, parsed.class_token, parsed.is_reg) == expected


@pytest.mark.parametrize("name", [
    "dog", "img", "reg", "0_dog", "_dog", "10_", "10_ ", "x10_dog", "20240101_holiday", "", "a/b/",
])
def test_not_subset_names(name: str) -> None:
    assert parse_subset_dir(name) is None


def test_class_tokens_are_what_kohya_captions_with() -> None:
    parsed = parse_subset_dir("img/10_sks dog")
    assert isinstance(parsed, SubsetName) and parsed.class_tokens == "sks dog"
    assert SubsetInfo(name="1_dog", class_token="dog", is_reg=True).folder == "1_dog"
    assert SubsetInfo(name="default").folder == "default"


# --- a kohya-style upload -----------------------------------------------------------------------

def kohya_zip() -> bytes:
    return make_zip([
        ("./", b""),  # some archivers write the root as an entry
        ("img/", b""),
        ("img/10_sks dog/a.png", PNG),
        ("img/10_sks dog/a.caption", "\ufeffa photo of sks dog,\r\non grass\n".encode()),
        ("img/10_sks dog/a.txt", b"dog, grass"),  # .caption comes first in the default order
        ("img/10_sks dog/orphan.txt", b"no image here"),
        ("reg/1_dog/b.jpg", image_bytes(600, 520, "JPEG", seed=1)),
        ("__MACOSX/img/10_sks dog/._a.png", b"\x00\x05\x16\x07 not an image"),
        (".DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("dataset_config.toml", b"[general]\nenable_bucket = true\n"),
        ("nested.zip", make_zip([("x.png", PNG)])),
    ])


def test_kohya_zip_ingests() -> None:
    result = ingest(files=[], zips=[("set.zip", kohya_zip())])
    assert [(s.name, s.repeats, s.identifier, s.class_token, s.is_reg) for s in result.subsets] == [
        ("10_sks dog", 10, "sks", "dog", False), ("1_dog", 1, None, "dog", True)]
    a, b = result.items
    assert (a.path, a.subset, a.filename, a.format, a.width, a.height) == (
        "img/10_sks dog/a.png", "10_sks dog", "a.png", "png", 64, 64)
    assert a.caption == "a photo of sks dog, on grass"  # BOM dropped, one line
    assert a.flags == ("small",) and a.data == PNG
    assert (b.path, b.subset, b.format, b.caption, b.flags) == ("reg/1_dog/b.jpg", "1_dog", "jpeg", None, ())
    assert result.config_toml == "[general]\nenable_bucket = true\n"
    ignored = {entry.path: entry.reason for entry in result.ignored}
    assert set(ignored) == {"img/10_sks dog/a.txt", "img/10_sks dog/orphan.txt",
                            "__MACOSX/img/10_sks dog/._a.png", ".DS_Store", "nested.zip"}
    assert "no image" in ignored["img/10_sks dog/orphan.txt"]
    assert "nested" in ignored["nested.zip"]
    assert result.duplicates == [] and result.renamed == []


def test_multipart_files_honour_relative_paths_and_min_side() -> None:
    big = image_bytes(96, 80, seed=2)
    result = ingest(files=[("10_sks dog/a.png", PNG), ("10_sks dog/a.txt", b"sks dog"), ("loose.png", big)],
                    zips=[], limits=IngestLimits(min_side=64))
    assert [(i.path, i.subset, i.caption, i.flags) for i in result.items] == [
        ("10_sks dog/a.png", "10_sks dog", "sks dog", ()), ("loose.png", "default", None, ())]
    assert [(s.name, s.is_reg) for s in result.subsets] == [("10_sks dog", False), ("default", False)]


def test_only_guessed_reg_folders_train() -> None:
    """``10_ohwx`` alone looks like a reg folder by the space rule; alone it can only be training."""
    result = ingest(files=[("10_ohwx/a.png", PNG)], zips=[])
    assert [(s.name, s.identifier, s.class_token, s.is_reg) for s in result.subsets] == [
        ("10_ohwx", "ohwx", None, False)]


def test_duplicates_kept_once_and_reported() -> None:
    archive = make_zip([("img/10_sks dog/a.png", PNG), ("img/10_sks dog/copy.png", PNG),
                        ("img/10_sks dog/copy.caption", b"from the copy")])
    result = ingest(files=[("first.png", image_bytes(32, 32, seed=5))], zips=[("z.zip", archive)])
    assert [i.path for i in result.items] == ["first.png", "img/10_sks dog/a.png"]
    assert result.duplicates == [("img/10_sks dog/a.png", "img/10_sks dog/copy.png")]
    assert result.items[1].caption == "from the copy"  # the kept image had none


def test_clashing_names_are_renamed_not_lost() -> None:
    one, two = image_bytes(16, 16, seed=6), image_bytes(16, 16, seed=7)
    archive = make_zip([("10_sks dog/a.png", two)])
    result = ingest(files=[("10_sks dog/a.png", one)], zips=[("z.zip", archive)])
    assert [i.path for i in result.items] == ["10_sks dog/a.png", "10_sks dog/a_2.png"]
    assert result.renamed == [("10_sks dog/a.png", "10_sks dog/a_2.png")]


# --- refusals ------------------------------------------------------------------------------------

def test_zip_slip_refused() -> None:
    slip = make_zip([("img/../../evil.png", PNG)])
    assert refused(zips=[("z.zip", slip)]) == ("zip:img/../../evil.png", 422)
    assert refused(files=[("../evil.png", PNG)]) == ("files[0]", 422)
    assert refused(files=[("a/.. /evil.png", PNG)]) == ("files[0]", 422)  # Windows trims ".. "


@pytest.mark.parametrize("name", ["/etc/evil.png", "C:/evil.png", "c:evil.png", "\\\\server\\evil.png"])
def test_absolute_paths_refused(name: str) -> None:
    assert refused(zips=[("z.zip", make_zip([(name, PNG)]))]) == (f"zip:{name}", 422)


def test_symlink_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("img/10_sks dog/a.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    assert refused(zips=[("z.zip", buffer.getvalue())]) == ("zip:img/10_sks dog/a.png", 422)


def test_too_many_files_refused() -> None:
    archive = make_zip([(f"{i}.png", image_bytes(8, 8, seed=i)) for i in range(4)])
    assert refused(zips=[("z.zip", archive)], limits=IngestLimits(max_files=3)) == ("zip", 413)
    two = [("a.png", PNG), ("b.png", PNG)]
    assert refused(files=two, limits=IngestLimits(max_files=1)) == ("files[1]", 413)


def test_too_large_refused() -> None:
    archive = make_zip([("a.png", PNG), ("b.png", image_bytes(64, 64, seed=1))])
    small_total = IngestLimits(max_total_bytes=len(PNG) + 100)
    assert refused(zips=[("z.zip", archive)], limits=small_total) == ("zip", 413)
    assert refused(zips=[("z.zip", archive)], limits=IngestLimits(max_file_bytes=1000)) == ("zip:a.png", 413)
    assert refused(files=[("a.png", PNG)], limits=IngestLimits(max_file_bytes=1000)) == ("files[0]", 413)


def test_lying_header_sizes_refused() -> None:
    """The central directory says 100 bytes; the data is the whole image. Reading stops at the
    declared size and the CRC no longer matches, so the entry is refused, not half-read."""
    lying = patch_headers(make_zip([("img/10_sks dog/a.png", PNG)]), file_size=100)
    assert refused(zips=[("z.zip", lying)]) == ("zip:img/10_sks dog/a.png", 422)
    # Claiming more than is there fails too (the data ends early).
    stored = make_zip([("a.png", PNG)], compression=zipfile.ZIP_STORED)
    assert refused(zips=[("z.zip", patch_headers(stored, file_size=len(PNG) + 10))]) == ("zip:a.png", 422)


def test_ratio_bomb_refused() -> None:
    archive = make_zip([("img/10_sks dog/bomb.bmp", bytes(4 * 1024 * 1024))])
    assert refused(zips=[("z.zip", archive)]) == ("zip:img/10_sks dog/bomb.bmp", 413)


def test_encrypted_refused() -> None:
    encrypted = patch_headers(make_zip([("a.png", PNG)]), flag_bits=0x1)
    assert refused(zips=[("z.zip", encrypted)]) == ("zip:a.png", 422)


def test_non_zip_refused() -> None:
    assert refused(zips=[("z.zip", b"this is not an archive")]) == ("zip", 422)
    assert refused(zips=[("z.zip", PNG)]) == ("zip", 422)


def test_corrupt_image_refused() -> None:
    assert refused(zips=[("z.zip", make_zip([("img/1_x y/bad.png", b"not a png at all")]))]) == (
        "zip:img/1_x y/bad.png", 422)
    assert refused(files=[("ok.png", PNG), ("bad.jpg", PNG[:200])]) == ("files[1]", 422)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert refused(files=[("fake.png", gif.getvalue())]) == ("files[0]", 422)  # decodes, but not accepted


def test_pixel_bomb_refused() -> None:
    assert refused(files=[("big.png", png_claiming(5000, 5000))]) == ("files[0]", 413)  # over our limit
    bomb = png_claiming(30_000, 30_000)  # over Pillow's own guard too
    assert refused(files=[("bomb.png", bomb)]) == ("files[0]", 413)
    archive = make_zip([("img/1_x y/bomb.png", bomb)])
    assert refused(zips=[("z.zip", archive)]) == ("zip:img/1_x y/bomb.png", 413)


def test_non_image_multipart_file_refused() -> None:
    assert refused(files=[("a.png", PNG), ("notes.pdf", b"%PDF-1.7")]) == ("files[1]", 422)
    assert refused(files=[("archive.zip", make_zip([("a.png", PNG)]))]) == ("files[0]", 422)


def test_invalid_utf8_caption_refused() -> None:
    assert refused(files=[("a.png", PNG), ("a.caption", b"caf\xe9")]) == ("files[1]", 422)
    archive = make_zip([("img/10_sks dog/a.png", PNG), ("img/10_sks dog/a.txt", b"\xff\xfe\xfa")])
    assert refused(zips=[("z.zip", archive)]) == ("zip:img/10_sks dog/a.txt", 422)


def test_empty_upload_refused() -> None:
    assert refused(zips=[("z.zip", make_zip([("readme.md", b"hi")]))]) == ("zip", 422)


def test_one_name_for_two_kinds_refused() -> None:
    archive = make_zip([("img/1_dog/a.png", PNG), ("reg/1_dog/b.png", image_bytes(8, 8, seed=3))])
    assert refused(zips=[("z.zip", archive)]) == ("zip:reg/1_dog/b.png", 422)


# --- report --------------------------------------------------------------------------------------

def test_report() -> None:
    train = SubsetInfo(name="10_sks dog", repeats=10, identifier="sks", class_token="dog")
    reg = SubsetInfo(name="1_dog", repeats=1, class_token="dog", is_reg=True)
    items = [
        ItemSummary(subset=train, width=512, height=512, caption="a dog", tags=["dog", "grass"]),
        ItemSummary(subset=train, width=1024, height=768, tags=["dog"], flags=()),
        ItemSummary(subset=train, width=300, height=534, caption="small", tags=[" dog ", "dog"],
                    flags=("small",)),
        ItemSummary(subset=reg, width=1920, height=1080),
        ItemSummary(subset=reg, width=1000, height=333),
    ]
    report = build_report(items, duplicates=2)
    assert report["subsets"] == [
        {"name": "10_sks dog", "repeats": 10, "identifier": "sks", "class_token": "dog", "is_reg": False,
         "images": 3},
        {"name": "1_dog", "repeats": 1, "identifier": None, "class_token": "dog", "is_reg": True,
         "images": 2},
    ]
    assert report["totals"] == {"images": 5, "train_images": 3, "reg_images": 2,
                                "repeated_train_images": 30, "repeated_reg_images": 2}
    assert report["size"] == {"width": {"min": 300, "max": 1920, "median": 1000.0},
                              "height": {"min": 333, "max": 1080, "median": 534.0}}
    assert report["aspect_ratios"] == {"1:1": 1, "4:3": 1, "3:4": 0, "3:2": 0, "2:3": 0, "16:9": 1, "9:16": 1,
                                       "other": 1}
    assert report["captions"] == {"present": 2, "missing": 3, "tagged": 3}
    assert report["tags"] == [{"tag": "dog", "count": 3}, {"tag": "grass", "count": 1}]
    assert report["flags"] == {"small": 1} and report["flagged"] == 1 and report["duplicates"] == 2
    assert build_report([])["size"] is None


@pytest.mark.parametrize(("size", "bucket"), [
    ((512, 512), "1:1"), ((530, 512), "1:1"), ((540, 512), "other"), ((1024, 768), "4:3"),
    ((768, 1024), "3:4"), ((1920, 1080), "16:9"), ((1080, 1920), "9:16"), ((600, 400), "3:2"),
    ((1000, 200), "other"),
])
def test_aspect_buckets(size: tuple[int, int], bucket: str) -> None:
    assert aspect_bucket(*size) == bucket


# --- export --------------------------------------------------------------------------------------

def test_export_round_trip() -> None:
    source = ingest(files=[], zips=[("set.zip", kohya_zip())])
    extra = image_bytes(40, 30, "WEBP", seed=9)
    items = [ExportItem(subset=i.subset, filename=i.filename, data=i.data, caption=i.caption)
             for i in source.items]
    items.append(ExportItem(subset="10_sks dog", filename="c.webp", data=extra, tags=["dog", "running"]))
    archive = export_zip(items=items, subsets=source.subsets, metadata=None)

    back = ingest(files=[], zips=[("export.zip", archive)])
    assert back.subsets == source.subsets
    assert [(i.path, i.subset, i.caption, i.data) for i in back.items] == [
        ("img/10_sks dog/a.png", "10_sks dog", "a photo of sks dog, on grass", PNG),
        ("reg/1_dog/b.jpg", "1_dog", None, source.items[1].data),
        ("img/10_sks dog/c.webp", "10_sks dog", "dog, running", extra),  # tags stand in for a caption
    ]
    assert back.ignored == [] and back.config_toml is not None

    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        assert sorted(opened.namelist()) == [
            "dataset_config.toml", "img/10_sks dog/a.caption", "img/10_sks dog/a.png",
            "img/10_sks dog/c.caption", "img/10_sks dog/c.webp", "metadata.json", "reg/1_dog/b.jpg"]
        metadata = json.loads(opened.read("metadata.json"))
        config = tomllib.loads(opened.read("dataset_config.toml").decode())
    # kohya fine-tuning metadata: keys relative to img/ without extension, tags comma-joined.
    assert metadata == {
        "10_sks dog/a": {"caption": "a photo of sks dog, on grass"},
        "10_sks dog/c": {"tags": "dog, running"},
    }
    assert back.metadata == metadata
    assert config == {
        "general": {"enable_bucket": True},
        "datasets": [{"subsets": [
            {"image_dir": "img/10_sks dog", "num_repeats": 10, "class_tokens": "sks dog", "is_reg": False,
             "caption_extension": ".caption"},
            {"image_dir": "reg/1_dog", "num_repeats": 1, "class_tokens": "dog", "is_reg": True,
             "caption_extension": ".caption"},
        ]}],
    }


def test_export_options() -> None:
    subsets = [SubsetInfo(name="default"), SubsetInfo(name='5_ohwx "q"', repeats=5, identifier='ohwx "q"')]
    items = [
        ExportItem(subset="default", filename="a.png", data=PNG, caption="a cat", tags=["cat"]),
        ExportItem(subset="default", filename="A.jpg", data=b"x", caption="line one\nline two"),
        ExportItem(subset='5_ohwx "q"', filename="q.png", data=PNG),
    ]
    archive = export_zip(items=items, subsets=subsets, caption_extension=".txt", write_tags_in_captions=True,
                         metadata={"default/a": {"caption": "edited"}})
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        assert opened.read("img/default/a.txt") == b"a cat, cat"
        assert opened.read("img/default/A_2.txt") == b"line one line two"  # one stem per caption file
        assert json.loads(opened.read("metadata.json")) == {
            "default/a": {"caption": "edited", "tags": "cat"},
            "default/A_2": {"caption": "line one line two"},
        }
        config = tomllib.loads(opened.read("dataset_config.toml").decode())
    assert config["datasets"][0]["subsets"] == [
        {"image_dir": "img/default", "num_repeats": 1, "is_reg": False, "caption_extension": ".txt"},
        {"image_dir": 'img/5_ohwx "q"', "num_repeats": 5, "class_tokens": 'ohwx "q"', "is_reg": False,
         "caption_extension": ".txt"}]
    with pytest.raises(ValueError, match="unknown subset"):
        export_zip(items=[ExportItem(subset="nope", filename="a.png", data=PNG)], subsets=subsets)
    with pytest.raises(ValueError, match="not a safe"):
        export_zip(items=[ExportItem(subset="default", filename="../a.png", data=PNG)], subsets=subsets)
    with pytest.raises(ValueError, match="names no exported"):
        export_zip(items=items, subsets=subsets, metadata={"default/zzz": {"caption": "x"}})


def test_metadata_keys_resolve_the_way_kohya_finds_images(tmp_path: Path) -> None:
    """kohya's fine-tuning loader globs ``<image_dir>/<key>.<ext>`` for a key that is not a file;
    with ``image_dir = "img"`` every key must find exactly its own image."""
    subsets = [SubsetInfo(name="10_sks [dog]", repeats=10, identifier="sks", class_token="[dog]"),
               SubsetInfo(name="2_cpc rabbit", repeats=2, identifier="cpc", class_token="rabbit")]
    items = [ExportItem(subset="10_sks [dog]", filename="a*.png", data=PNG, caption="one"),
             ExportItem(subset="2_cpc rabbit", filename="a.jpg", data=b"jpeg", caption="two")]
    with zipfile.ZipFile(io.BytesIO(export_zip(items=items, subsets=subsets))) as opened:
        opened.extractall(tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text(encoding="utf-8"))
    image_dir = str(tmp_path / "img")
    found = {key: [path for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp")
                   for path in glob.glob(glob.escape(os.path.join(image_dir, key + ext)))]
             for key in metadata}
    assert found == {"10_sks [dog]/a*": [os.path.join(image_dir, "10_sks [dog]", "a*.png")],
                     "2_cpc rabbit/a": [os.path.join(image_dir, "2_cpc rabbit", "a.jpg")]}
