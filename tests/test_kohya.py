"""kohya sd-scripts compatibility: dataset config, buckets, epoch counting, sample prompts."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from services.gateway.datasets.export import ExportItem, export_zip
from services.gateway.datasets.ingest import SubsetInfo
from services.gateway.datasets.kohya import (
    SubsetMode,
    make_buckets,
    parse_dataset_config,
    subset_from_folder,
)
from services.gateway.trainings.buckets import assign_bucket, epoch_plan, fit_to_bucket, steps_per_epoch
from services.trainer.sampling import KOHYA_TO_LOOMIS_SCHEDULER
from shared.kohya import (
    KOHYA_SAMPLERS,
    ConfigError,
    SamplePrompt,
    parse_sample_prompts,
)
from shared.models import SCHEDULERS

# The three examples from kohya's train_README (config_README), keys as sd-scripts spells them.
CLASS_TOKENS_TOML = r"""
[general]
enable_bucket = true                        # Whether to use Aspect Ratio Bucketing

[[datasets]]
resolution = 512                            # Training resolution
batch_size = 4                              # Batch size

  [[datasets.subsets]]
  image_dir = 'C:\hoge'                     # Training images
  class_tokens = 'hoge girl'                # identifier class
  num_repeats = 10                          # Repeats of the training images

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'                      # Regularisation images
  class_tokens = 'girl'                     # class
  num_repeats = 1
"""

CAPTIONS_TOML = r"""
[general]
enable_bucket = true

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  caption_extension = '.caption'
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'girl'
  num_repeats = 1
"""

FINE_TUNING_TOML = r"""
[general]
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
"""

# kohya config_README's inheritance example: general < dataset < subset.
INHERITANCE_TOML = r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = [512, 768]
batch_size = 2
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  caption_extension = '.caption'
  keep_tokens = 0
  flip_aug = true

[[datasets]]
resolution = 768
batch_size = 1

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
"""


# ---------------------------------------------------------------------------------------------
# Dataset config


def test_class_tokens_example() -> None:
    (dataset,) = parse_dataset_config(CLASS_TOKENS_TOML).datasets
    assert (dataset.resolution, dataset.batch_size, dataset.enable_bucket) == ((512, 512), 4, True)
    train, reg = dataset.subsets
    assert (train.image_dir, train.class_tokens, train.num_repeats) == ("C:\\hoge", "hoge girl", 10)
    assert not train.is_reg
    assert train.mode is SubsetMode.CLASS_TOKENS
    assert (reg.is_reg, reg.class_tokens, reg.num_repeats) == (True, "girl", 1)
    assert reg.mode is SubsetMode.CLASS_TOKENS
    assert not dataset.is_fine_tuning
    assert dataset.buckets() == make_buckets(resolution=(512, 512))


def test_captions_example() -> None:
    (dataset,) = parse_dataset_config(CAPTIONS_TOML).datasets
    train, reg = dataset.subsets
    assert train.mode is SubsetMode.CAPTIONS
    assert train.caption_extension == ".caption"
    assert reg.mode is SubsetMode.CLASS_TOKENS
    assert reg.effective_caption_extension == ".caption"


def test_fine_tuning_example() -> None:
    (dataset,) = parse_dataset_config(FINE_TUNING_TOML).datasets
    (subset,) = dataset.subsets
    assert subset.mode is SubsetMode.FINE_TUNING
    assert subset.metadata_file == "C:\\piyo\\piyo_md.json"
    assert (subset.shuffle_caption, subset.keep_tokens, subset.num_repeats) == (True, 1, 1)  # from [general]
    assert dataset.is_fine_tuning
    assert not dataset.enable_bucket
    assert dataset.buckets() == [(512, 512)]


def test_inheritance_subset_over_dataset_over_general() -> None:
    first, second = parse_dataset_config(INHERITANCE_TOML).datasets
    hoge, fuga = first.subsets
    assert first.resolution == (512, 768)
    assert (hoge.shuffle_caption, hoge.caption_extension, hoge.keep_tokens, hoge.num_repeats) == (
        True, ".txt", 2, 3)
    assert (fuga.caption_extension, fuga.keep_tokens, fuga.flip_aug) == (".caption", 0, True)
    assert not hoge.flip_aug
    (piyo,) = second.subsets
    assert (second.resolution, second.batch_size) == ((768, 768), 1)
    assert (piyo.keep_tokens, piyo.caption_extension) == (1, ".txt")  # the first dataset's values stay there


def test_defaults_are_the_last_fallback() -> None:
    toml = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n"
    (dataset,) = parse_dataset_config(toml).datasets
    assert (dataset.resolution, dataset.batch_size) == (None, 1)
    (dataset,) = parse_dataset_config(toml, defaults={"resolution": [768, 512], "batch_size": 2}).datasets
    assert (dataset.resolution, dataset.batch_size) == ((768, 512), 2)
    with pytest.raises(ConfigError) as info:
        parse_dataset_config(toml, defaults={"batch_size": 0})
    assert info.value.field == "defaults.batch_size"


def test_loomis_export_parses() -> None:
    subsets = [SubsetInfo(name="a", repeats=10, identifier="sks", class_token="dog"),
               SubsetInfo(name="r", repeats=1, class_token="dog", is_reg=True)]
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    items = [ExportItem(subset="a", filename="x.png", data=buffer.getvalue(), caption="a dog"),
             ExportItem(subset="r", filename="y.png", data=buffer.getvalue())]
    archive = export_zip(items=items, subsets=subsets, caption_extension=".txt")
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        toml = zf.read("dataset_config.toml").decode()
    (dataset,) = parse_dataset_config(toml).datasets
    assert [(s.num_repeats, s.class_tokens, s.is_reg, s.mode) for s in dataset.subsets] == [
        (10, "sks dog", False, SubsetMode.CAPTIONS), (1, "dog", True, SubsetMode.CAPTIONS)]


@pytest.mark.parametrize(("toml", "field", "suggestion"), [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n[[datasets.subsets]]\nimage_dir='b'\nnum_repeat=2\n",
     "datasets.0.subsets.1.num_repeat", "num_repeats"),
    ("[generale]\nenable_bucket=true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
     "generale", "general"),
    ("[[datasets]]\n[[datasets.sottoinsiemi]]\nimage_dir='a'\n", "datasets.0.sottoinsiemi", "subsets"),
    ("[[datasets]]\n[[datasets.subset]]\nimage_dir='a'\n", "datasets.0.subset", "subsets"),
    ("[general]\nshufle_caption=true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
     "general.shufle_caption", "shuffle_caption"),
])
def test_unknown_key_names_the_path_and_close_matches(toml: str, field: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_dataset_config(toml)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert repr(field.rsplit(".", 1)[-1]) in str(info.value)
    assert repr(suggestion) in str(info.value)


@pytest.mark.parametrize(("toml", "field", "words"), [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeats=0\n",
     "datasets.0.subsets.0.num_repeats", "at least 1"),
    ("[[datasets]]\nbatch_size='4'\n[[datasets.subsets]]\nimage_dir='a'\n",
     "datasets.0.batch_size", "integer"),
    ("[general]\nflip_aug=1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
     "general.flip_aug", "true"),
    ("[general]\nenable_bucket=true\nresolution=520\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
     "general.resolution", "multiple of bucket_reso_steps"),
    ("[[datasets]]\nenable_bucket=true\nresolution=[512,576]\nbucket_reso_steps=128\n"
     "[[datasets.subsets]]\nimage_dir='a'\n", "datasets.0.resolution", "multiple"),
    ("[[datasets]]\nenable_bucket=true\nresolution=1280\n[[datasets.subsets]]\nimage_dir='a'\n",
     "datasets.0.resolution", "max_bucket_reso"),
    ("[[datasets]]\nresolution=[512]\n[[datasets.subsets]]\nimage_dir='a'\n",
     "datasets.0.resolution", "[width"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\ncaption_dropout_rate=1.5\n",
     "datasets.0.subsets.0.caption_dropout_rate", "[0.0, 1.0]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\ncaption_extension='txt'\n",
     "datasets.0.subsets.0.caption_extension", "'.txt'"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nresolution=512\n",
     "datasets.0.subsets.0.resolution", "[general] or [[datasets]]"),
    ("[general]\nimage_dir='a'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
     "general.image_dir", "[[datasets.subsets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats=2\n", "datasets.0.subsets.0.image_dir", "image_dir"),
    ("[[datasets]]\nresolution=512\n", "datasets.0.subsets", "at least one"),
    ("[general]\nenable_bucket=true\n", "datasets", "[[datasets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file='m.json'\nis_reg=true\n",
     "datasets.0.subsets.0.is_reg", "fine-tuning"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n[[datasets.subsets]]\nmetadata_file='m.json'\n",
     "datasets.0.subsets.1.metadata_file", "separate [[datasets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nclass_tokens='  '\n",
     "datasets.0.subsets.0.class_tokens", "empty"),
    ("[[datasets]]\nmin_bucket_reso=1024\nmax_bucket_reso=512\n[[datasets.subsets]]\nimage_dir='a'\n",
     "datasets.0.min_bucket_reso", "above"),
    ("datasets = 3\n", "datasets", "array of tables"),
    ("[[datasets]\n", "", "not valid TOML"),
])
def test_bad_values_name_the_path(toml: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_dataset_config(toml)
    assert info.value.field == field
    assert words in str(info.value)


def test_fine_tuning_ignores_inherited_dreambooth_keys() -> None:
    toml = ("[general]\nclass_tokens='girl'\ncaption_extension='.txt'\n"
            "[[datasets]]\n[[datasets.subsets]]\nmetadata_file='m.json'\n")
    (subset,) = parse_dataset_config(toml).datasets[0].subsets
    assert (subset.class_tokens, subset.caption_extension, subset.image_dir) == (None, None, None)


def test_subset_from_folder_reuses_the_folder_rules() -> None:
    subset = subset_from_folder("img/20_sls frog")
    assert (subset.num_repeats, subset.class_tokens, subset.is_reg) == (20, "sls frog", False)
    assert subset.mode is SubsetMode.CLASS_TOKENS
    assert subset_from_folder("reg/1_frog", image_dir="/data/reg/1_frog").is_reg
    with pytest.raises(ConfigError):
        subset_from_folder("holiday")


# ---------------------------------------------------------------------------------------------
# Buckets


def test_buckets_for_512_match_kohya() -> None:
    # kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), worked by hand: area 262144.
    assert make_buckets(resolution=(512, 512), min_reso=256, max_reso=1024, steps=64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
        (1024, 256),
    ]


def test_buckets_non_square_resolution_and_min_reso() -> None:
    buckets = make_buckets(resolution=(512, 768), min_reso=384, max_reso=1024, steps=64)
    assert (576, 576) in buckets  # floor(sqrt(393216) = 627.06 / 64) * 64
    assert all(min(b) >= 384 and max(b) <= 1024 and b[0] * b[1] <= 512 * 768 for b in buckets)
    assert all(b[0] % 64 == 0 and b[1] % 64 == 0 for b in buckets)
    assert (256, 1024) not in buckets
    assert buckets == sorted(buckets)


def test_landscape_image_goes_to_closest_aspect_bucket() -> None:
    buckets = make_buckets(resolution=(512, 512))
    # 1.5: 640x384 (1.667) is closer than 576x448 (1.286)
    fit = fit_to_bucket(1200, 800, buckets)
    assert fit.bucket == (640, 384)
    assert fit.resized == (640, 427)  # width fits, height covers and is centre-cropped
    assert fit.crop == (0, 21)
    assert fit.ar_error == pytest.approx(640 / 384 - 1.5)
    assert assign_bucket(1200, 800, buckets) == (640, 384)
    assert assign_bucket(800, 1200, buckets) == (384, 640)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)


def test_exact_bucket_size_is_kept() -> None:
    buckets = make_buckets(resolution=(512, 512))
    assert fit_to_bucket(704, 320, buckets) == ((704, 320), (704, 320), (0, 0), 0.0)


def test_wide_image_crops_sideways() -> None:
    fit = fit_to_bucket(3000, 1000, make_buckets(resolution=(512, 512)))
    assert fit.bucket == (832, 256)  # 3.25 versus 3.0: closer than 768x320's 2.4
    assert fit.resized == (832, 277)  # scaled to the bucket's width, rounding half up
    assert fit.crop == (0, 10)


def test_no_upscale_buckets_from_the_image() -> None:
    assert fit_to_bucket(300, 200, [], no_upscale=True, max_area=512 * 512) == (
        (256, 192), (300, 200), (22, 4), 256 / 192 - 1.5)
    big = fit_to_bucket(2000, 1000, [], no_upscale=True, max_area=512 * 512)
    assert big.bucket[0] * big.bucket[1] <= 512 * 512
    # 704x320 (rounding the width) misses 2:1 by 0.2; 640x320 (rounding the height) hits it
    assert big.bucket == big.resized == (640, 320)
    with pytest.raises(ValueError):
        fit_to_bucket(300, 200, [], no_upscale=True)


# ---------------------------------------------------------------------------------------------
# Epochs


def test_surplus_regularisation_images_are_unused() -> None:
    assert steps_per_epoch([(5, 10, False), (200, 1, True)], batch_size=1) == 100
    plan = epoch_plan([(5, 10, False), (200, 1, True)], batch_size=1)
    assert (plan.train_items, plan.reg_items) == (50, 50)
    assert plan.reg_repeats[1].count(1) == 50 and plan.reg_repeats[1].count(0) == 150


def test_scarce_regularisation_images_are_repeated() -> None:
    plan = epoch_plan([(5, 10, False), (20, 1, True)], batch_size=1)
    assert (plan.train_items, plan.reg_items, plan.steps) == (50, 50, 100)
    assert plan.reg_repeats[1] == (3,) * 10 + (2,) * 10


def test_regularisation_repeats_may_overshoot() -> None:
    plan = epoch_plan([(5, 10, False), (100, 3, True)], batch_size=4)
    assert plan.reg_items == 51  # 17 images x 3 repeats, the first to reach 50
    assert plan.steps == -(-101 // 4)


def test_no_regularisation_and_no_training() -> None:
    assert steps_per_epoch([(5, 10, False)], batch_size=4) == 13
    assert epoch_plan([(0, 1, False), (10, 1, True)], batch_size=1).steps == 0


def test_batches_are_per_bucket() -> None:
    square, wide = (512, 512), (640, 384)
    plan = epoch_plan([(3, 2, False)], batch_size=4, buckets_of_images=[[square, square, wide]])
    assert dict(plan.bucket_items) == {square: 4, wide: 2}
    assert plan.steps == 2
    # 5 per bucket with batch 4 needs 2 + 2, where one bucket would need 3
    assert steps_per_epoch([(2, 5, False)], batch_size=4, buckets_of_images=[[square, wide]]) == 4
    with pytest.raises(ValueError):
        steps_per_epoch([(2, 5, False)], batch_size=4, buckets_of_images=[[square]])


# ---------------------------------------------------------------------------------------------
# Sample prompts

PROMPTS = """# prompt 1
masterpiece, best quality, 1girl, in white shirts, upper body, looking at viewer \
--n low quality, worst quality, bad anatomy,bad composition --w 768 --h 768 --d 1 --l 7.5 --s 28

# prompt 2
masterpiece, best quality, 1boy, in business suit, standing at street, looking back \
--n low quality, worst quality --w 576 --h 832 --d 2 --l 5.5 --s 40 --ss k_euler_a
"""


def test_sample_prompts_from_the_docs() -> None:
    first, second = parse_sample_prompts(PROMPTS)
    assert first == SamplePrompt(
        prompt="masterpiece, best quality, 1girl, in white shirts, upper body, looking at viewer",
        negative="low quality, worst quality, bad anatomy,bad composition",
        width=768, height=768, seed=1, scale=7.5, steps=28, sampler=None, line=2)
    assert (second.width, second.height, second.seed, second.scale, second.steps, second.sampler) == (
        576, 832, 2, 5.5, 40, "k_euler_a")
    assert second.negative == "low quality, worst quality"
    assert second.line == 5


def test_sample_prompt_defaults_and_kohya_quirks() -> None:
    (plain, odd) = parse_sample_prompts("\n  \na cat\n--not a comment\n#comment\n")[:2]
    assert plain == SamplePrompt(prompt="a cat", line=3)
    assert (plain.width, plain.height, plain.scale, plain.steps, plain.seed) == (512, 512, 7.5, 30, None)
    assert odd.prompt == "--not a comment"  # only " --" separates options
    (prompt,) = parse_sample_prompts("a dog --W 770 --h 20 --s 5000 --ar 16:9 --SS Euler_A --n bad --n worse")
    assert (prompt.width, prompt.height, prompt.steps) == (768, 64, 1000)
    assert prompt.sampler == "euler_a"
    assert prompt.negative == "worse"
    assert prompt.ignored == ("--ar 16:9",)


@pytest.mark.parametrize(("line", "option"), [
    ("a cat --w big", "--w"), ("a cat --h -5", "--h"), ("a cat --d 1.5", "--d"),
    ("a cat --l seven", "--l"), ("a cat --s ", "--s"), ("a cat --ss euler_ancestral", "--ss"),
])
def test_bad_sample_values_name_the_line(line: str, option: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sample_prompts(f"# header\n\nfine prompt --w 512\n{line}\n")
    assert info.value.line == 4
    assert info.value.field == option
    assert str(info.value).startswith("line 4: ")


def test_sampler_mapping_covers_kohya_and_names_loomis_schedulers() -> None:
    assert set(KOHYA_TO_LOOMIS_SCHEDULER) == set(KOHYA_SAMPLERS)
    assert len(KOHYA_SAMPLERS) == 16
    assert all(name in SCHEDULERS for name in KOHYA_TO_LOOMIS_SCHEDULER.values())
    assert KOHYA_TO_LOOMIS_SCHEDULER["k_euler_a"] == "Euler a"
    assert KOHYA_TO_LOOMIS_SCHEDULER["dpmsolver++"] == "DPM++ 2M"
    # built as kohya's sample_images builds them
    assert SCHEDULERS[KOHYA_TO_LOOMIS_SCHEDULER["dpmsolver"]] == (
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"})
    assert SCHEDULERS[KOHYA_TO_LOOMIS_SCHEDULER["dpmsingle"]][0] == "DPMSolverSinglestepScheduler"
    assert SCHEDULERS[KOHYA_TO_LOOMIS_SCHEDULER["k_dpm_2_a"]][0] == "KDPM2AncestralDiscreteScheduler"
