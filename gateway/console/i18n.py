"""The console's labels in Chinese (the default) and English.

One table, key -> (中文, English); a template reads ``t.key``. A key missing from the table
fails the page (StrictUndefined in the templates), so no label is left untranslated.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

Language = Literal["zh", "en"]

LABELS: dict[str, tuple[str, str]] = {
    "title": ("idgate 合规控制台", "idgate compliance console"),
    "skip": ("跳到正文", "Skip to content"),
    "language": ("语言", "Language"),
    "home": ("首页", "Home"),
    "subject": ("个人查询", "Subject"),
    "ledger": ("同意账本", "Ledger"),
    "rights": ("个人权利请求", "Rights requests"),
    "quarantine": ("身份合并审核", "Identity review"),
    "sign_in": ("登录", "Sign in"),
    "sign_out": ("退出", "Sign out"),
    "token": ("管理令牌", "Admin token"),
    "signed_in_as": ("当前用户", "Signed in as"),
    "role": ("角色", "Role"),
    "role_compliance": ("合规官", "compliance officer"),
    "role_operator": ("运维", "operator"),
    "role_auditor": ("审计员（只读）", "auditor (read-only)"),
    "sign_in_failed": ("令牌、用户名或密码错误", "Unknown token, or wrong name or password"),
    "sign_in_intro": (
        "使用管理 API 的令牌或控制台账号登录。会话在闲置后自动结束。",
        "Sign in with an admin API token or a console account. The session ends after a while without use.",
    ),
    "with_token": ("管理令牌", "With an admin token"),
    "with_password": ("控制台账号", "With a console account"),
    "user_name": ("用户名", "Name"),
    "password": ("密码", "Password"),
    "too_many_attempts": (
        "登录失败次数过多，请十五分钟后再试",
        "Too many failed sign-ins: try again in a quarter of an hour",
    ),
    "tenant": ("租户", "Tenant"),
    "choose": ("选择", "Show"),
    "what_you_can_do": ("可用功能", "What you can do here"),
    "home_subject": (
        "按任一标识查找个人：标识、身份簇、同意状态与时间线",
        "Find a person by any identifier: identifiers, identity cluster, consent state and timeline",
    ),
    "home_ledger": (
        "浏览并校验同意账本，下载签名导出",
        "Browse and verify the consent ledger, download signed exports",
    ),
    "home_rights": ("按截止日期处理个人权利请求", "Work through data-subject rights requests by due date"),
    "home_quarantine": ("断路器拦下的身份合并", "Identity merges the circuit breaker held back"),
    # subject
    "search": ("查找", "Search"),
    "identifier": ("标识", "Identifier"),
    "identifier_type": ("标识类型", "Identifier type"),
    "appid": ("小程序 appid（openid 需要）", "Mini-program appid (for an openid)"),
    "at": ("时间点（可选，UTC）", "At (optional, UTC)"),
    "search_note": (
        "标识在服务器端假名化后查询；原始值不会被保存、记录或显示。",
        "The identifier is pseudonymised on the server; the raw value is never stored, logged or shown.",
    ),
    "pseudonym": ("假名", "Pseudonym"),
    "found_subject": ("查询对象", "Subject"),
    "unified_id": ("统一 ID", "Unified ID"),
    "identifiers": ("该人的标识", "The person's identifiers"),
    "type": ("类型", "Type"),
    "cluster": ("身份簇与关联路径", "Identity cluster and how each link was made"),
    "path": ("路径", "Path"),
    "source": ("来源", "Source"),
    "rule": ("规则", "Rule"),
    "event": ("事件", "Event"),
    "no_links": ("没有其他关联标识", "No other identifier is linked"),
    "identity_off": ("该租户未启用身份解析", "Identity resolution is off for this tenant"),
    "consent_state": ("各目的的同意状态", "Consent state per purpose"),
    "purpose": ("目的", "Purpose"),
    "state": ("状态", "State"),
    "notice": ("隐私政策版本", "Notice version"),
    "kind": ("类型", "Kind"),
    "since": ("自", "Since"),
    "no_consent": ("没有同意记录（默认拒绝）", "No consent record (default deny)"),
    "timeline": ("同意时间线", "Consent timeline"),
    "time": ("时间", "Time"),
    "record": ("记录", "Record"),
    "platform": ("平台", "Platform"),
    "deliveries": ("依据这些同意的投递", "Deliveries that relied on these grants"),
    "destination": ("目的地", "Destination"),
    "minor": ("未满十四周岁", "Under 14"),
    # ledger
    "records": ("记录", "Records"),
    "filter": ("筛选", "Filter"),
    "until": ("至", "Until"),
    "next_page": ("下一页", "Next page"),
    "verify": ("校验账本", "Verify the ledger"),
    "verify_note": (
        "与 idgate ledger verify 相同的校验：哈希链与签名检查点",
        "The same check as idgate ledger verify: hash chain and signed checkpoints",
    ),
    "verify_ok": ("账本完整", "The ledger is intact"),
    "verify_bad": ("账本被篡改", "The ledger was tampered with"),
    "first_bad": ("第一条有问题的记录", "First tampered record"),
    "problem": ("问题", "Problem"),
    "checkpoints": ("检查点", "Checkpoints"),
    "signed_through": ("签名覆盖至", "Signed through"),
    "export": ("签名导出", "Signed export"),
    "export_jsonl": ("JSONL（含检查点与签名）", "JSONL (with checkpoints and seal)"),
    "export_csv": ("CSV 记录", "CSV records"),
    "export_checkpoints": ("CSV 检查点", "CSV checkpoints"),
    "seq": ("序号", "Seq"),
    "no_records": ("没有记录", "No records"),
    # rights
    "queue": ("请求队列（按截止日期）", "Queue (by due date)"),
    "open_request": ("登记新请求", "Open a request"),
    "request": ("请求", "Request"),
    "status": ("状态", "Status"),
    "received": ("收到", "Received"),
    "due": ("截止", "Due"),
    "days_left": ("剩余工作日", "Working days left"),
    "overdue": ("已逾期", "Overdue"),
    "nearly_due": ("即将到期", "Nearly due"),
    "on_time": ("按期", "On time"),
    "closed": ("已结束", "Closed"),
    "requested_by": ("请求人", "Requested by"),
    "channel": ("渠道", "Channel"),
    "verification": ("身份核验方式", "Identity verification"),
    "verification_outcome": ("核验结果", "Verification outcome"),
    "reference": ("工单号（可选）", "Case reference (optional)"),
    "steps": ("处理步骤", "Steps"),
    "outcome": ("结果", "Outcome"),
    "complete": ("完成请求", "Complete the request"),
    "extend": ("延长期限", "Extend the due date"),
    "working_days": ("工作日", "Working days"),
    "reason": ("原因", "Reason"),
    "bundle": ("下载访问数据包（签名 JSON）", "Download the access bundle (signed JSON)"),
    "no_requests": ("没有请求", "No requests"),
    "remaining": ("未覆盖", "Not reached"),
    "receipts": ("各接收方的删除回执", "Deletion receipts per destination"),
    "receipt": ("回执", "Receipt"),
    "receipt_pending": ("等待中", "pending"),
    "receipt_delivered": ("已送达", "delivered"),
    "receipt_acknowledged": ("已确认", "acknowledged"),
    "receipt_failed": ("失败（在死信队列中，重放后重试）", "failed (dead-lettered; retried on replay)"),
    "back": ("返回", "Back"),
    # quarantine
    "held_merges": ("被拦下的合并", "Held merges"),
    "no_quarantine": ("没有待审核的合并", "Nothing held for review"),
    "decision": ("决定", "Decision"),
    "approve": ("批准合并", "Approve"),
    "reject": ("拒绝", "Reject"),
    "review_note": (
        "批准后按常规规则合并（每类标识的上限仍然适用），并通知下游；每个决定都记入访问日志。",
        "Approving merges through the normal rules (the per-type limits still apply) and notifies "
        "downstream; every decision is in the access log.",
    ),
    "review_linked": ("已合并", "Merged"),
    "review_refused": (
        "已批准，但超出每类标识的上限，未合并",
        "Approved, but a per-type limit refuses the link",
    ),
    "review_rejected": ("已拒绝", "Rejected"),
    # notices and statistics
    "notices": ("隐私政策与统计", "Notices and statistics"),
    "home_notices": (
        "隐私政策版本，按目的、版本、平台的同意率",
        "Privacy-notice versions; consent rates by purpose, notice and platform",
    ),
    "notice_versions": ("隐私政策版本", "Privacy-notice versions"),
    "content_hash": ("内容哈希", "Content hash"),
    "material": ("重大变更", "Material change"),
    "purposes_changed": ("需重新同意的目的", "Purposes to re-consent"),
    "published": ("发布时间", "Published"),
    "yes": ("是", "yes"),
    "no": ("否", "no"),
    "consent_rates": ("同意率", "Consent rates"),
    "by_purpose": ("按目的", "By purpose"),
    "by_notice": ("按政策版本", "By notice"),
    "by_platform": ("按平台", "By platform"),
    "subjects": ("主体数", "Subjects"),
    "given": ("同意", "Given"),
    "withdrawn": ("撤回", "Withdrawn"),
    "rate": ("同意率", "Rate"),
    "checkpoint_list": ("签名检查点（最近 20 个）", "Signed checkpoints (latest 20)"),
    "key_id": ("密钥 ID", "Key id"),
    "root": ("Merkle 根", "Merkle root"),
    # errors
    "error": ("无法完成", "Could not do that"),
    "forbidden": ("您的角色不能打开此页面", "Your role may not open this page"),
    "csrf": (
        "表单已过期或缺少防伪令牌，请刷新页面",
        "The form lacks its CSRF token or has expired: reload the page",
    ),
    "sign_in_needed": ("请先登录", "Please sign in"),
    "not_found": ("没有找到", "Not found"),
    "bad_request": ("输入无效", "Invalid input"),
    "field": ("字段", "Field"),
}

_TABLES = {
    lang: MappingProxyType({key: texts[i] for key, texts in LABELS.items()})
    for i, lang in enumerate(("zh", "en"))
}


def labels_for(lang: str) -> MappingProxyType[str, str]:
    return _TABLES["en" if lang == "en" else "zh"]
