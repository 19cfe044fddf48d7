-- The budget ledger's two steps, prepended to each script whose first line is `--! ledger`
-- (orchestrator/store/scripts.py), so a job's money moves in the same step as the job.
-- A spec (JSON, built by orchestrator/store/ledger.py):
--   check  = {amount = <micro-USD>, limits = {{<label>, <settings hash>, <field>, <spend hash>}, ...}}
--            refused when a limit set in a settings hash would be passed: {label, limit - committed}
--   incr   = {{<hash>, <field>, <delta>}, ...}; expire = {{<key>, <seconds>}, ...}
-- A hash's time to live is set when it is created (an increment that answers its own delta is the
-- first write of its field), not on every write: the figures are kept from their first day.
local function ledger_refusal(spec)
  local c = spec['check']
  if c == nil or tonumber(c['amount']) <= 0 then return nil end
  local fields = {}  -- settings hash -> its limit fields: one HMGET per hash, not one HGET per limit
  for _, lim in ipairs(c['limits']) do
    fields[lim[2]] = fields[lim[2]] or {}
    table.insert(fields[lim[2]], lim[3])
  end
  local set = {}  -- settings hash -> {field -> limit, or false when unset}
  for hash, names in pairs(fields) do
    local values = redis.call('HMGET', hash, unpack(names))
    set[hash] = {}
    for i, name in ipairs(names) do set[hash][name] = values[i] end
  end
  for _, lim in ipairs(c['limits']) do
    local limit = set[lim[2]][lim[3]]
    if limit then
      local used = tonumber(redis.call('HGET', lim[4], 'committed') or '0')
      if used + tonumber(c['amount']) > tonumber(limit) then
        return {lim[1], tonumber(limit) - used}
      end
    end
  end
  return nil
end

local function ledger_apply(spec)
  local fresh = {}
  for _, op in ipairs(spec['incr'] or {}) do
    local delta = string.format('%d', op[3])
    if redis.call('HINCRBY', op[1], op[2], delta) == tonumber(delta) then fresh[op[1]] = true end
  end
  for _, e in ipairs(spec['expire'] or {}) do
    if fresh[e[1]] then redis.call('EXPIRE', e[1], e[2]) end
  end
end
