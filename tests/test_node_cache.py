"""The once-per-node cache lives in a folder only this user controls (dit_video.distributed.private_dir):
a folder another user could write to, a symlink, or someone else's folder is refused before any
result is read from it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dit_video.distributed import NODE_CACHE, once_per_node
from dit_video.errors import ConfigError


def _planted(cache):
    """What another user leaves behind: a forged result for the key the run will ask for."""
    once_per_node("the key", lambda: {"sha256": "forged"}, cache)


def test_a_fresh_cache_folder_is_private_and_reused(tmp_path):
    cache = tmp_path / "node" / "cache"
    assert once_per_node("the key", lambda: {"sha256": "abc"}, cache) == {"sha256": "abc"}
    st = os.lstat(cache)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert once_per_node("the key", lambda: {"sha256": "recomputed"}, cache) == {"sha256": "abc"}
    assert str(os.getuid()) in NODE_CACHE.name  # the default is per user, not one folder for everyone


def _group_writable(tmp_path):
    cache = tmp_path / "cache"
    _planted(cache)
    os.chmod(cache, 0o777)  # what mkdir(exist_ok=True) under a umask of 0 gives, or what another user made
    return cache, r"open to other users \(mode 777\)"


def _symlink(tmp_path):
    target = tmp_path / "elsewhere"
    _planted(target)
    (tmp_path / "cache").symlink_to(target)
    return tmp_path / "cache", "a symlink"


def _someone_elses(tmp_path):
    if os.getuid() != 0:  # only root can give a folder away; as a user, "/" is someone else's
        return Path("/"), r"owned by uid 0"
    cache = tmp_path / "cache"
    _planted(cache)
    os.chown(cache, 65534, 65534)  # nobody
    return cache, r"owned by uid 65534, not by this user"


def _a_file(tmp_path):
    (tmp_path / "cache").write_text(json.dumps({"result": {"sha256": "forged"}}))
    return tmp_path / "cache", "not a directory"


@pytest.mark.parametrize("make", [_group_writable, _symlink, _someone_elses, _a_file],
                         ids=["writable_by_others", "symlink", "someone_elses", "a_file"])
def test_a_cache_folder_others_control_is_refused(tmp_path, make):
    cache, reason = make(tmp_path)
    computed = []
    with pytest.raises(ConfigError, match=f"node cache folder '{cache}' is {reason}.*remove it"):
        once_per_node("the key", lambda: computed.append(1) or {"sha256": "abc"}, cache)
    assert computed == []  # refused before anything was read or computed
