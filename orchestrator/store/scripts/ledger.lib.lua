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
  for _, lim in ipairs(c['limits']) do
    local limit = redis.call('HGET', lim[2], lim[3])
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
