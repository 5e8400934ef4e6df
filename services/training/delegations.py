"""How a training job acts for its submitter, over auth's job delegations: made when the job is submitted (with the
submitter's token, through the training service's own certificate), kept with the job sealed under the training
master key, exchanged for short access tokens whenever the job needs one, and revoked when the job ends."""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt

from services.auth.client import AuthClient
from services.mesh.errors import FailedPrecondition
from services.mesh.identity import Principal, as_service, principal_of
from services.mesh.sealing import InvalidTag, WrongMasterKey, seal, unseal

__all__ = ["JobDelegations"]


class JobDelegations:
    """JobCredentials (services.training.core.service) over the auth service.

    The delegation secret never reaches the database in the clear: it is sealed (AES-256-GCM) under the training
    service's master key and bound to the job id. Access tokens live in memory only, renewed once less than a
    quarter of their lifetime is left, so a job acts for its submitter however long it runs, and again after a
    restart of the training service.
    """

    def __init__(
        self, auth: AuthClient, master_key: bytes, service: str = "training", clock: Callable[[], float] = time.time
    ) -> None:
        self._auth = auth
        self._key = master_key
        self._service = service
        self._clock = clock
        self._tokens: dict[str, Principal] = {}

    async def delegate(self, tenant: str, job_id: str) -> bytes:
        """A delegation from the caller of the RPC being served (whose token the channel forwards)."""
        created = await self._auth.create_delegation(tenant, job_id, self._service)
        return seal(self._key, created.secret.encode(), job_id.encode())

    @staticmethod
    def check_master_key(master_key: bytes, held: tuple[str, bytes] | None) -> None:
        """Refuses (WrongMasterKey) a master key that does not open a delegation held (job id, sealed): started with
        it, the service could act for none of its jobs (fail them, unable to cancel their runs or revoke their
        delegations). Blocking: called once, at start."""
        if held is None:
            return
        job_id, sealed = held
        try:
            unseal(master_key, sealed, job_id.encode())
        except InvalidTag:
            raise WrongMasterKey(
                f"the delegation of job {job_id} does not open with this master key: AIDC_TRAINING_MASTER_KEY (or "
                "<data_dir>/training/master.key) is not the key the training database was sealed with"
            ) from None

    def _secret(self, job_id: str, sealed: bytes) -> str:
        try:
            return unseal(self._key, sealed, job_id.encode()).decode()
        except InvalidTag:
            raise FailedPrecondition(
                "the job's delegation cannot be unsealed (was AIDC_TRAINING_MASTER_KEY changed?)"
            ) from None

    async def act_for(self, job_id: str, sealed: bytes) -> Principal:
        """The submitter, acting in the job's tenant, with an access token good for a while yet."""
        held = self._tokens.get(job_id)
        now = self._clock()
        if held is not None and held.expires_at - now > (held.expires_at - held.issued_at) / 4:
            return held
        secret = self._secret(job_id, sealed)
        with as_service():  # the service itself presents the delegation (its certificate, no end user's token)
            pair = await self._auth.exchange_delegation(secret)
        # The token comes straight from auth over the mesh: its claims are read, not verified again.
        token = pair.access_token
        principal = principal_of(
            token, jwt.decode(token, options={"verify_signature": False}), jwt.get_unverified_header(token)["kid"]
        )
        self._tokens[job_id] = principal
        return principal

    async def end(self, job_id: str, sealed: bytes) -> None:
        """Revokes the job's delegation (its tokens are refused from now on)."""
        self._tokens.pop(job_id, None)
        secret = self._secret(job_id, sealed)
        with as_service():
            await self._auth.revoke_delegation(secret)
