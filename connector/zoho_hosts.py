"""Zoho's published hosts and limits by data centre and edition (split from
``connector.config``): the data centres' accounts and API servers, the bulk upload hosts, and
the concurrency limit of each edition. The Zoho client and the configuration read them.
"""

from __future__ import annotations

# Zoho data centres: accounts server, API domain, bulk upload host, as hard-coded in Zoho's
# official SDKs (zohocrm-python-sdk-8.0 / zohocrm-java-sdk `dc/*DataCenter`; zoho-crm-api.md
# §1.5; docs/zoho-client.md "Fidelity: OAuth, hosts, formats, credits").
DATA_CENTRES: dict[str, tuple[str, str]] = {
    "us": ("https://accounts.zoho.com", "https://www.zohoapis.com"),
    "eu": ("https://accounts.zoho.eu", "https://www.zohoapis.eu"),
    "in": ("https://accounts.zoho.in", "https://www.zohoapis.in"),
    "au": ("https://accounts.zoho.com.au", "https://www.zohoapis.com.au"),
    "cn": ("https://accounts.zoho.com.cn", "https://www.zohoapis.com.cn"),
    "jp": ("https://accounts.zoho.jp", "https://www.zohoapis.jp"),
    "ca": ("https://accounts.zohocloud.ca", "https://www.zohoapis.ca"),
    "sa": ("https://accounts.zoho.sa", "https://www.zohoapis.sa"),
}
UPLOAD_HOSTS: dict[str, str] = {
    "us": "https://content.zohoapis.com",
    "eu": "https://content.zohoapis.eu",
    "in": "https://content.zohoapis.in",
    "au": "https://content.zohoapis.com.au",
    "cn": "https://content.zohoapis.com.cn",
    "jp": "https://content.zohoapis.jp",
    # CA and SA differ from the content.zohoapis.{tld} pattern (SDK ca_data_center.py /
    # sa_data_center.py: upload.zohocloud.ca, files.zoho.sa)
    "ca": "https://upload.zohocloud.ca",
    "sa": "https://files.zoho.sa",
}

EDITION_CONCURRENCY: dict[str, int] = {
    "free": 5,
    "standard": 10,
    "starter": 10,
    "professional": 15,
    "enterprise": 20,
    "zoho_one": 20,
    "ultimate": 25,
    "crm_plus": 25,
}
