"""A minimal client for the Dagster webserver's GraphQL API (``$MUSETALK_DAGSTER_URL``).

Raw queries over HTTP, because ``DagsterGraphQLClient`` has no call to add a dynamic partition and
other clients (curl, the .NET front end) use the same documents; see ``pipelines.submit``.
"""

import json
import os
import urllib.error
import urllib.request

from musetalk_ops.errors import MuseTalkError

DEFAULT_URL = "http://127.0.0.1:3000"
LOCATION = "musetalk"  # workspace.yaml location_name
REPOSITORY = "__repository__"  # the repository a Definitions object always yields


class DagsterApiError(MuseTalkError):
    """The webserver is unreachable or refused a request."""


def dagster_url(override: str | None = None) -> str:
    return (override or os.environ.get("MUSETALK_DAGSTER_URL") or DEFAULT_URL).rstrip("/")


class GraphQLClient:
    def __init__(self, url: str | None = None, timeout: float = 30.0):
        self.url = dagster_url(url)
        self.timeout = timeout

    def query(self, document: str, variables: dict | None = None) -> dict:
        """``data`` of the response; DagsterApiError on transport or GraphQL errors."""
        body = json.dumps({"query": document, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise DagsterApiError(f"Dagster API at {self.url} answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DagsterApiError(
                f"Dagster API at {self.url} is unreachable ({reason}): is `dagster dev` "
                "running? (set $MUSETALK_DAGSTER_URL)"
            ) from None
        if payload.get("errors"):
            raise DagsterApiError(
                f"Dagster API error: {payload['errors'][0].get('message', payload['errors'][0])}"
            )
        return payload["data"]
