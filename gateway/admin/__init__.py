"""The admin and compliance API: Litestar controllers behind role guards (gateway.auth)."""

from gateway.admin.breach import BreachController
from gateway.admin.consent import ConsentAuditController, NoticesController
from gateway.admin.deps import AdminServices
from gateway.admin.identity import IdentityController
from gateway.admin.monitoring import MonitoringController
from gateway.admin.rights import RightsController

ADMIN_CONTROLLERS = [
    ConsentAuditController,
    NoticesController,
    IdentityController,
    RightsController,
    MonitoringController,
    BreachController,
]

__all__ = ["ADMIN_CONTROLLERS", "AdminServices"]
