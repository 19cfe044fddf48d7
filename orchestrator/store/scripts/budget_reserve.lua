--! ledger
-- Hold a batch's whole estimate against its tenant's budgets, once per batch.
-- KEYS: 1 the batch's reservation marker
-- ARGV: 1 ledger spec JSON (ledger.lib.lua)
-- Returns '' (held now, or already held for this batch) or 'budget {field} {remaining micro-USD}'.
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local ledger = cjson.decode(ARGV[1])
local refused = ledger_refusal(ledger)
if refused then return 'budget ' .. refused[1] .. ' ' .. string.format('%d', refused[2]) end
ledger_apply(ledger)
redis.call('SET', KEYS[1], '1', 'EX', 8 * 24 * 3600)
return ''
