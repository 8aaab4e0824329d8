"""What kind of file a Slack file object is, from its mimetype, Slack filetype and name. Pure."""

from __future__ import annotations

from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any


class Kind(StrEnum):
    IMAGE = "image"
    TEXT = "text"
    PDF = "pdf"
    DOCX = "docx"
    XLSX = "xlsx"
    PPTX = "pptx"
    UNSUPPORTED = "unsupported"


# Image formats Kimi reads as `image_url` parts (data URLs), by mimetype.
IMAGE_MIMETYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "webp"}

OFFICE = {
    "docx": Kind.DOCX,
    "xlsx": Kind.XLSX,
    "pptx": Kind.PPTX,
}
OFFICE_MIMETYPES = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": Kind.DOCX,
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": Kind.XLSX,
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": Kind.PPTX,
}

# Text by extension (or Slack filetype, which is mostly the same word): prose, data, logs, source code.
TEXT_EXTENSIONS = frozenset(
    {
        "txt", "text", "md", "markdown", "rst", "csv", "tsv", "json", "jsonl", "ndjson", "yaml", "yml",
        "toml", "ini", "cfg", "conf", "env", "log", "out", "xml", "html", "htm", "css", "scss", "sql",
        "py", "pyi", "js", "mjs", "cjs", "ts", "tsx", "jsx", "java", "kt", "kts", "scala", "go", "rs",
        "c", "h", "cc", "cpp", "hpp", "cs", "rb", "php", "pl", "swift", "m", "mm", "sh", "bash", "zsh",
        "fish", "ps1", "bat", "lua", "r", "jl", "hs", "ex", "exs", "erl", "clj", "dart", "vue", "svelte",
        "tf", "hcl", "proto", "graphql", "gradle", "properties", "diff", "patch", "dockerfile", "makefile",
        "tex", "srt", "vtt",
    }
)  # fmt: skip
# Slack filetypes for text that are not an extension above ("text", "post", "snippet" kinds of files).
TEXT_FILETYPES = frozenset(
    {"text", "markdown", "python", "javascript", "typescript", "shell", "csharp", "cpp", "kotlin", "ruby"}
)
TEXT_MIMETYPES = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/javascript",
        "application/x-sh",
        "application/sql",
    }
)


def extension(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    return suffix or PurePosixPath(name).name.lower()  # "Dockerfile", "Makefile"


def classify(ref: dict[str, Any]) -> Kind:
    """The kind of a Slack file object (`mimetype`, `filetype`, `name`): what it can be read as."""
    mimetype = str(ref.get("mimetype") or "").lower().split(";", 1)[0].strip()
    filetype = str(ref.get("filetype") or "").lower()
    ext = extension(str(ref.get("name") or ref.get("title") or ""))
    if mimetype in IMAGE_MIMETYPES or (not mimetype.startswith("image/") and ext in IMAGE_EXTENSIONS):
        return Kind.IMAGE
    if mimetype.startswith("image/") and filetype in IMAGE_EXTENSIONS:
        return Kind.IMAGE
    if mimetype == "application/pdf" or filetype == "pdf" or ext == "pdf":
        return Kind.PDF
    if mimetype in OFFICE_MIMETYPES:
        return OFFICE_MIMETYPES[mimetype]
    if filetype in OFFICE or ext in OFFICE:
        return OFFICE.get(filetype) or OFFICE[ext]
    if mimetype.startswith("image/"):
        return Kind.UNSUPPORTED  # svg, heic, tiff...: not an image Kimi reads
    if (
        mimetype.startswith("text/")
        or mimetype in TEXT_MIMETYPES
        or filetype in TEXT_FILETYPES
        or filetype in TEXT_EXTENSIONS
        or ext in TEXT_EXTENSIONS
    ):
        return Kind.TEXT
    return Kind.UNSUPPORTED
