"""Currencies as ISO 4217 defines them: which codes exist, and how many digits their minor unit
has. Prices are integers in the minor unit, so a yen price of 1000 is ¥1000 and a dinar price of
1000 is 1.000 KWD."""

# ISO 4217 list one, published 2026-01-01, by the digits of each currency's minor unit. Codes
# without a minor unit (precious metals, special drawing rights, the codes for testing and for
# "no currency") cannot price a sale and are left out.
_CODES_BY_DIGITS = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    2: """AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
          CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
          GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK
          LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO
          NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS
          SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST
          XAD XCD XCG YER ZAR ZMW ZWG""",
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
}

MINOR_DIGITS: dict[str, int] = {
    code: digits for digits, codes in _CODES_BY_DIGITS.items() for code in codes.split()
}


def major_units(amount_minor: int, currency: str) -> str:
    """An amount as people read it: 1050 INR is "10.50", 1050 JPY is "1050"."""
    digits = MINOR_DIGITS.get(currency, 2)  # a sale stored before codes were checked
    if digits == 0:
        return str(amount_minor)
    whole, fraction = divmod(amount_minor, 10**digits)
    return f"{whole}.{fraction:0{digits}d}"
