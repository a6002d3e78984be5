"""The dask dashboard link, printed only when it serves the dashboard.

A scheduler always runs an HTTP server (health, metrics), so ``client.dashboard_link`` names an address
even when that server has no dashboard: a scheduler started with ``--no-dashboard`` answers 404, and one
without bokeh answers a page saying that bokeh is needed.  :func:`dashboard_link` asks the page itself
(or, for the scheduler of kgrad's own local cluster, which runs in this process, whether it loaded the
dashboard).
"""

from __future__ import annotations

import ipaddress
import sys
import urllib.parse
import urllib.request

# distributed's page when the scheduler cannot import bokeh ("Dask needs bokeh>=... for the dashboard.")
_MISSING_BOKEH = b"for the dashboard.</p>"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serves_dashboard(link: str, timeout: float = 5.0) -> bool:
    """True if ``link`` answers with dask's dashboard page (not a 404, not the 'needs bokeh' page)."""
    host = urllib.parse.urlsplit(link).hostname or ""
    # loopback: straight there, whatever the proxy settings; elsewhere as the environment says
    opener = (urllib.request.build_opener(urllib.request.ProxyHandler({})) if _is_loopback(host)
              else urllib.request.build_opener())
    try:
        with opener.open(link, timeout=timeout) as response:
            if response.status != 200:
                return False
            body = response.read(1 << 16)
    except Exception:  # HTTP errors (404), refused, timeouts, bad URLs: no page to show
        return False
    return _MISSING_BOKEH not in body


def dashboard_link(client, timeout: float = 5.0, local: bool = False) -> str | None:
    """The dashboard link of ``client``'s scheduler if it serves the dashboard, else None.

    ``local``: the scheduler runs in this process (a LocalCluster kgrad started), so whether it serves the
    dashboard is known without asking the page (rendering it costs that scheduler, in this process, about
    0.3 s): it does when it could import distributed's dashboard module (bokeh is there), as distributed
    decides when the scheduler starts."""
    try:
        if "dashboard" not in client.scheduler_info().get("services", {}):
            return None
        link = client.dashboard_link
    except Exception:  # distributed.dashboard.link with an unknown variable, and the like
        return None
    if not link:
        return None
    if local:
        return link if "distributed.dashboard.scheduler" in sys.modules else None
    return link if serves_dashboard(link, timeout) else None
