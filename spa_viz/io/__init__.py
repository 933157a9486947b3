"""The ground floor: files in and out. Checkpoints (safetensors + JSON), atomic writes and the
output guard, image reading, cache folders, strict config loading and the one timer.

Nothing here knows about SPA; every other package of spa_viz may import from here.
"""
