"""Prefect Block types for registered infrastructure."""

from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block

B = TypeVar("B", bound=Block)


def http_base_url(value: str) -> str:
    """A block's base_url (a lab's, an LLM provider's): http:// or https://, without its trailing slash."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"base_url {value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


def some_names(value: list[str], what: str) -> list[str]:
    """A block's list of names (a lab's resources, a provider's models): at least one, none empty."""
    if not value or any(not name.strip() for name in value):
        raise ValueError(f"list at least one {what}, none of them empty")
    return value


async def registered(block_type: type[B]) -> dict[str, B]:
    """Every saved block of the type (HPC clusters, LLM providers, plugins) by name, read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    async with get_client() as client:
        try:
            documents = await client.read_block_documents_by_type(block_type.get_block_type_slug())
        except ObjectNotFound:
            return {}
        except PrefectHTTPStatusError as exc:
            # no block of the type was ever saved, so Prefect does not know the type yet
            if exc.response.status_code == 404:
                return {}
            raise
    return {doc.name: block_type._from_block_document(doc) for doc in documents if not doc.is_anonymous}
