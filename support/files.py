"""
Reading and writing files safely, for every file this project writes: a missing or malformed JSON file is one
error naming it, and every write goes to a temporary file that is renamed into place, so a crash leaves the old
file or the new one, never half of one.

    write_json("out/eval/step0010.json", records)
    records = read_json("out/eval/step0010.json")
"""
import json
import os
import tempfile


def read_json(path, expect=None):
    """The parsed JSON file; a missing or malformed file, or (expect=dict or list) one of another shape, is one
    error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found" + (" (a directory)" if os.path.isdir(path) else ""))
    try:
        with open(path) as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if expect is not None and not isinstance(out, expect):
        raise ValueError(f"{path}: expected a JSON {'object' if expect is dict else 'list'}, got "
                         f"{type(out).__name__ if out is not None else 'null'}")
    return out


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new one, never half of one.
    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-" + os.path.basename(path))
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception):  # e.g. a full disk: one line naming the file
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise OSError(f"could not write {path} ({reason}); any earlier {os.path.basename(path)} is unchanged") \
                from None
        raise


def write_json(path, obj, indent=2):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
    atomic_write(path, write)


def save_safetensors(path, tensors):
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
