"""Whether the Hugging Face hub can be reached, decided fast.

Without a network, the hub client retries for about 25 s before failing; one HEAD request with a
short timeout says the same at once, so offline users get their advice without the wait."""
from __future__ import annotations

PROBE_TIMEOUT_S = 5.0


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: only the local cache may be used."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """None if the hub endpoint answers (or offline mode is set), else the endpoint that did not."""
    import requests
    from huggingface_hub import constants

    if hub_offline():
        return None
    try:
        requests.head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except requests.RequestException:
        return constants.ENDPOINT
    return None
