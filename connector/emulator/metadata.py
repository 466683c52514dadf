"""Metadata responses (users, org, modules, fields) built from the emulator's module config.
Every key Zoho's OpenAPI marks as required is present, so that the official SDK and the
contract tests accept them."""

from __future__ import annotations

from typing import Any

from connector.emulator.config import EmulatorConfig, FieldSpec, ModuleSpec

JSON_TYPE = {
    "text": "string",
    "textarea": "string",
    "email": "string",
    "phone": "string",
    "website": "string",
    "picklist": "string",
    "multiselectpicklist": "jsonarray",
    "integer": "integer",
    "bigint": "string",
    "double": "double",
    "currency": "double",
    "percent": "double",
    "decimal": "double",
    "boolean": "boolean",
    "date": "string",
    "datetime": "string",
    "lookup": "jsonobject",
    "subform": "jsonarray",
}
# Zoho reports decimals as data_type "double".
ZOHO_DATA_TYPE = {"decimal": "double"}


def _field_id(module: ModuleSpec, index: int) -> str:
    base = int(module.id or "4876876000000500001")
    return str(base + 1000 + index)


def _lookup_meta(spec: FieldSpec) -> dict[str, Any] | None:
    """Field metadata ``lookup`` (crm-oas v8.0 fields.json ``lookup``: ``module`` is the
    target module; ``query_details``, ``revalidate_filter_during_edit``, ``show_fields`` are
    required keys)."""
    if spec.lookup_module is None:
        return None
    return {
        "display_label": spec.label or spec.api_name.replace("_", " "),
        "api_name": spec.api_name,
        "query_details": {},
        "module": {"api_name": spec.lookup_module, "id": None},
        "id": None,
        "revalidate_filter_during_edit": False,
        "show_fields": [],
    }


def field_meta(module: ModuleSpec, spec: FieldSpec, index: int, created: str) -> dict[str, Any]:
    label = spec.label or spec.api_name.replace("_", " ")
    fid = _field_id(module, index)
    return {
        "associated_module": {"api_name": None, "id": None},
        "data_type": ZOHO_DATA_TYPE.get(spec.data_type, spec.data_type),
        "operation_type": {
            "web_update": True,
            "api_create": True,
            "web_create": True,
            "api_update": True,
        },
        "system_mandatory": spec.mandatory,
        "webhook": True,
        "blueprint_supported": False,
        "virtual_field": False,
        "field_read_only": False,
        "customizable_properties": [],
        "read_only": False,
        "custom_field": spec.api_name != "Name",
        "businesscard_supported": True,
        "filterable": True,
        "visible": True,
        "available_in_user_layout": True,
        "display_field": spec.api_name == "Name",
        "pick_list_values_sorted_lexically": False,
        "sortable": True,
        "layout_associations": [],
        "separator": False,
        "searchable": True,
        "enable_colour_code": False,
        "mass_update": True,
        "json_type": JSON_TYPE[spec.data_type],
        "created_source": "default" if spec.api_name == "Name" else "crm",
        "type": "used",
        "display_label": label,
        "column_name": spec.api_name.upper(),
        "api_name": spec.api_name,
        "display_type": -1,
        "ui_type": 1,
        "colour_code_enabled_by_system": False,
        "length": spec.max_length,
        "decimal_place": spec.decimal_places if JSON_TYPE[spec.data_type] == "double" else None,
        "quick_sequence_number": str(index + 1),
        "email_parser": {"fields_update_supported": False, "record_operations_supported": False},
        "rollup_summary": None,
        "refer_from_field": {"id": None, "api_name": None},
        "created_time": created,
        "modified_time": created,
        "show_type": 7,
        "category": 0,
        "id": fid,
        "multi_module_lookup": None,
        "sharing_properties": {},
        "currency": {"rounding_option": "normal", "precision": 2}
        if spec.data_type == "currency"
        else None,
        "file_upolad_optionlist": [],
        "lookup": _lookup_meta(spec),
        "profiles": [],
        "view_type": {"view": True, "edit": True, "quick_create": False, "create": True},
        "unique": {"casesensitive": "0"} if spec.unique else None,
        "sub_module": {"api_name": None, "id": None},
        "subform": {"module": spec.subform_module or spec.api_name, "id": fid}
        if spec.data_type == "subform"
        else None,
        "external": {"show": False, "type": None},
        "formula": None,
        "convert_mapping": {},
        "multiselectlookup": None,
        "multiuserlookup": {
            "display_label": None,
            "linking_module": {"api_name": None, "id": None},
            "connected_module": {"api_name": None, "id": None},
            "lookup_apiname": None,
            "api_name": None,
            "connectedfield_apiname": None,
            "connectedlookup_apiname": None,
            "id": None,
            "record_access": None,
        },
        "autonumber": {
            "starting_number_length": 0,
            "prefix": None,
            "suffix": None,
            "start_number": None,
        },
        "auto_number": None,
        "pick_list_values": [
            {
                "colour_code": None,
                "actual_value": v,
                "type": "used",
                "id": str(int(fid) * 10 + n),
                "sequence_number": n + 1,
                "display_value": v,
            }
            for n, v in enumerate(spec.picklist)
        ],
        "crypt": {"mode": None, "status": None},
        "tooltip": {"name": "", "value": ""},
        "history_tracking": {
            "module": {},
            "duration_configured_field": {"api_name": None, "id": None},
        },
        "association_details": {
            "related_field": {"api_name": None, "id": None},
            "lookup_field": {"api_name": None, "id": None},
        },
        "allowed_modules": [],
        "additional_column": None,
        "field_label": label,
        "common.picklist": None,
        "hipaa_compliance_enabled": False,
        "hipaa_compliance": {"restricted_in_export": None, "restricted": None},
        "_update_existing_records": False,
        "number_separator": False,
        "textarea": {"type": "large" if spec.max_length > 2000 else "small"}
        if spec.data_type == "textarea"
        else {},
        "static_field": False,
    }


def fields_response(config: EmulatorConfig, module: ModuleSpec, created: str) -> dict[str, Any]:
    return {"fields": [field_meta(module, f, i, created) for i, f in enumerate(module.fields)]}


def module_meta(
    config: EmulatorConfig, module: ModuleSpec, seq: int, created: str
) -> dict[str, Any]:
    return {
        "common.search_supported": True,
        "deletable": True,
        "description": None,
        "creatable": True,
        "recycle_bin_on_delete": True,
        "inventory_template_supported": False,
        "modified_time": created,
        "plural_label": module.plural_label or module.api_name,
        "presence_sub_menu": False,
        "triggers_supported": True,
        "id": module.id or str(4876876000000500001 + seq),
        "chart_view": False,
        "isBlueprintSupported": False,
        "visibility": 1,
        "visible": True,
        "convertable": False,
        "editable": True,
        "emailTemplate_support": False,
        "email_parser_supported": False,
        "filter_supported": True,
        "show_as_tab": True,
        "web_link": None,
        "sequence_number": seq + 1,
        "singular_label": module.singular_label or module.api_name,
        "viewable": True,
        "api_supported": True,
        "api_name": module.api_name,
        "quick_create": True,
        "generated_type": "custom",
        "feeds_required": False,
        "scoring_supported": False,
        "webform_supported": False,
        "arguments": [],
        "module_name": module.api_name,
        "chart_view_supported": False,
        "profile_count": 1,
        "business_card_field_limit": 5,
        "track_current_data": False,
        "modified_by": {"name": config.user.name, "id": config.user.id},
        "profiles": [],
        "parent_module": None,
        "activity_badge": None,
        "$field_states": [],
        "business_card_fields": [],
        "per_page": None,
        "$properties": [],
        "$on_demand_properties": [],
        "search_layout_fields": [],
        "kanban_view_supported": False,
        "lookup_field_properties": {"fields": []},
        "kanban_view": False,
        "related_lists": [],
        "filter_status": True,
        "related_list_properties": {
            "sort_by": {"api_name": None, "id": None},
            "fields": [],
            "sort_order": None,
        },
        "display_field": None,
        "layouts": [],
        "fields": [],
        "custom_view": None,
        "zia_view": False,
        "default_mapping_fields": [],
        "layout_associations": [],
    }


def modules_response(config: EmulatorConfig, created: str) -> dict[str, Any]:
    return {"modules": [module_meta(config, m, i, created) for i, m in enumerate(config.modules)]}


def user_meta(config: EmulatorConfig, created: str) -> dict[str, Any]:
    u = config.user
    first, _, last = u.name.partition(" ")
    return {
        "id": u.id,
        "zuid": u.zuid,
        "full_name": u.name,
        "first_name": first,
        "last_name": last or first,
        "email": u.email,
        "status": "active",
        "confirm": True,
        "role": {"name": "CEO", "id": "4876876000000026005"},
        "profile": {"name": "Administrator", "id": "4876876000000026011"},
        "language": "en_US",
        "locale": "en_US",
        "country_locale": "en_US",
        "time_format": "HH:mm",
        "date_format": "MMM d, yyyy",
        "decimal_separator": "Period",
        "created_time": created,
        "Modified_Time": created,
        "category": "regular_user",
        "Isonline": True,
        "sandboxDeveloper": False,
        "microsoft": False,
        "personal_account": False,
    }


def users_response(config: EmulatorConfig, created: str) -> dict[str, Any]:
    return {
        "users": [user_meta(config, created)],
        "info": {"per_page": 200, "count": 1, "page": 1, "more_records": False},
    }


def org_response(config: EmulatorConfig) -> dict[str, Any]:
    return {
        "org": [
            {
                "id": "4876876000000021001",
                "zgid": config.org_id,
                "company_name": "Emulated Company",
                "primary_email": config.user.email,
                "time_zone": "UTC",
                "currency": "US Dollar - USD",
                "iso_code": "USD",
                "type": "production",
                "license_details": {"paid": True, "paid_type": "enterprise"},
            }
        ]
    }
