"""Ray's cluster token, found where Ray keeps it, for `moesafe run --address` and `moesafe submit`
alike (Ray itself sends it only to a cluster it finds on its own, not to an explicit address)."""
from __future__ import annotations

import logging

# Ray 2.59+ clusters started with `ray start` require a token unless RAY_AUTH_MODE=disabled.
TOKEN_HELP = ("the Ray cluster at {address} requires its authentication token, and none it accepts was found "
              "here: put the token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` on the head "
              "prints it), and leave RAY_AUTH_MODE unset or set it to token")


def use_ray_auth_token() -> None:
    """Send the Ray token when one exists where Ray keeps it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token), as `ray job` does, unless RAY_AUTH_MODE says otherwise; quietly."""
    try:
        from ray._private.authentication import authentication_token_setup as token_setup
    except ImportError:  # a Ray without token authentication
        return
    logger = logging.getLogger(token_setup.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "token authentication is enabled" warning is not news here
    try:
        token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)
