"""The images ``predict.py --images`` names: files, folders and http(s) URLs, the URLs fetched into a folder.

A URL is fetched with urllib (no other dependency), with a timeout and a size bound; one that fails (no answer,
an HTTP error, too large) is skipped with its cause and the others go on. Whether what came back is an image is
``datasets.images.check_image``'s to say, as for a file.
"""
import http.client
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from datasets.folder import image_files

URL_SCHEMES = ('http://', 'https://')
MAX_DOWNLOAD_BYTES = 100 * 2 ** 20  # a photo is a few MB; past this it is not one (or not worth holding in memory)
USER_AGENT = 'predict.py (urllib)'  # some servers refuse urllib's default agent


@dataclass
class ImageSources:
    """Local ``files`` to classify in order (files and folders first, then fetched URLs), the name each is shown
    by (its URL for a fetched one), and the (source, cause) of URLs that could not be fetched."""
    files: List[str] = field(default_factory=list)
    shown: Dict[str, str] = field(default_factory=dict)
    failed: List[Tuple[str, str]] = field(default_factory=list)

    def name(self, path: str) -> str:
        return self.shown.get(path, path)


def is_url(source: str) -> bool:
    return source.lower().startswith(URL_SCHEMES)


def fetch(url: str, path: Path, timeout: float) -> str:
    """Write what ``url`` serves into ``path``; '' when that worked, else why not, in one line."""
    request = urllib.request.Request(url, headers={'User-Agent': USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
            unsent = response.length  # bytes its Content-Length announced that did not come (None: none announced)
    except urllib.error.HTTPError as err:
        return f'HTTP {err.code} {err.reason}'
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        # no server or no answer, a malformed URL, a server that does not speak HTTP
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, TimeoutError):
            return f'no answer within {timeout:g} s (--url-timeout)'
        return f'cannot fetch it ({reason})'
    if len(data) > MAX_DOWNLOAD_BYTES:
        return f'larger than {MAX_DOWNLOAD_BYTES // 2 ** 20} MB, not fetched; download it and pass the file'
    if unsent:
        return f'the connection closed after {len(data)} of {len(data) + unsent} bytes'
    path.write_bytes(data)
    return ''


def gather_images(sources: Sequence[str], folder: Path, timeout: float) -> ImageSources:
    """The image files of ``sources`` (files, folders, URLs); URLs are fetched into ``folder``. Missing local
    paths are refused (``image_files``) before anything is fetched."""
    local = [s for s in sources if not is_url(s)]
    found = ImageSources(files=image_files(local) if local else [])
    for i, url in enumerate(s for s in sources if is_url(s)):
        path = Path(folder) / f'url{i:04d}'  # Pillow reads an image by its content, not its name
        problem = fetch(url, path, timeout)
        if problem:
            found.failed.append((url, problem))
        else:
            found.files.append(str(path))
            found.shown[str(path)] = url
    return found
