import {
  IApi,
  INotice,
  NSMLModel,
  burnRate,
  classifyStreamEvent,
  creditsLow,
  filterSessions,
  gpuUseNow,
  progressFraction,
  reduceSessions,
  sessionActions,
  sessionCredits,
  sessionNotice,
  sessionOwnerLabel,
  sessionPath,
  sessionRate,
  sortSessions,
  DEFAULT_FILTER,
  SESSIONS_LISTING
} from '../src/model';
import { ISession } from '../src/tokens';
import { session } from './fixtures';

const NOW = Date.parse('2026-01-01T01:00:00Z');

describe('classifyStreamEvent', () => {
  test.each([
    [
      'a service event row names the session and its new state',
      'message',
      {
        id: 7,
        session: 'alice/mnist/1',
        user: 'alice',
        kind: 'state',
        state: 'failed',
        message: 'exit 1'
      },
      { kind: 'session', session: 'alice/mnist/1', state: 'failed', message: 'exit 1', full: null }
    ],
    [
      'a named session event wrapping the event row in data',
      'session',
      { data: { session: 'alice/mnist/2', state: 'running' } },
      { kind: 'session', session: 'alice/mnist/2', state: 'running', message: null, full: null }
    ],
    [
      'an unknown state is kept as no state (the row is refetched)',
      'session',
      { session: 'alice/mnist/2', state: 'exploded' },
      { kind: 'session', session: 'alice/mnist/2', state: null, message: null, full: null }
    ],
    [
      'a submission by the type field',
      'message',
      { type: 'submission', id: 3, dataset: 'mnist@1', state: 'scored' },
      { kind: 'submission', id: 3, dataset: 'mnist@1', state: 'scored' }
    ],
    [
      'credits by the event name',
      'credits',
      { user: 'alice', balance: 12.5 },
      { kind: 'credits', balance: 12.5 }
    ],
    ['a reset (missed too much): reload', 'reset', null, { kind: 'hello' }],
    [
      "the service's hello is left to the connection's open event",
      'hello',
      { user: 'a', last_id: 3 },
      null
    ],
    [
      'the upstream connection dropped',
      'status',
      { connected: false, message: 'service unreachable' },
      { kind: 'status', connected: false, message: 'service unreachable' }
    ],
    [
      "a service session event: the session's present state wins over the event's",
      'session',
      {
        id: 9,
        kind: 'state',
        session: 'alice/mnist/3',
        user: 'alice',
        state: 'running',
        message: 'started',
        now: { name: 'alice/mnist/3', state: 'completed', message: null, reason: 'completed' }
      },
      {
        kind: 'session',
        session: 'alice/mnist/3',
        state: 'completed',
        message: 'started',
        full: null
      }
    ],
    [
      'credits (the service names it "credit")',
      'credit',
      { user: 'alice', balance: 4.5, change: -0.5, reason: 'charge alice/mnist/3' },
      { kind: 'credits', balance: 4.5 }
    ],
    [
      'a notice (a GPU notebook server about to stop for credits)',
      'notice',
      {
        subject: 'notebook server stopping: out of credits',
        message: 'it stops in 120 s',
        level: 'warning',
        at: '2026-12-02T21:00:00Z'
      },
      {
        kind: 'notice',
        level: 'warning',
        message: 'notebook server stopping: out of credits: it stops in 120 s'
      }
    ],
    ['an empty notice is ignored', 'notice', { subject: '', message: '' }, null],
    ['anything else is ignored', 'message', { foo: 1 }, null],
    ['a non-object is ignored', 'message', 42, null]
  ])('%s', (_, name, data, want) => {
    expect(classifyStreamEvent(name, data)).toEqual(want);
  });

  test('a whole session replaces the row', () => {
    const s = session({ state: 'completed' });
    expect(classifyStreamEvent('session', { session: s })).toEqual({
      kind: 'session',
      session: s.name,
      state: 'completed',
      message: null,
      full: s
    });
  });
});

describe('reduceSessions', () => {
  const running = session();
  const map = new Map([[running.name, running]]);

  test('a state change updates the row and keeps the others', () => {
    const other = session({ name: 'alice/mnist/2', id: 2 });
    const next = reduceSessions(new Map([...map, [other.name, other]]), {
      kind: 'session',
      session: running.name,
      state: 'failed',
      message: 'exit code 1',
      full: null
    });
    expect(next.get(running.name)!.state).toBe('failed');
    expect(next.get(running.name)!.message).toBe('exit code 1');
    expect(next.get(other.name)).toBe(other);
    expect(map.get(running.name)!.state).toBe('running'); // not mutated
  });

  test('a late "running" never revives an ended session', () => {
    const ended = new Map([[running.name, session({ state: 'completed' })]]);
    const next = reduceSessions(ended, {
      kind: 'session',
      session: running.name,
      state: 'running',
      message: null,
      full: null
    });
    expect(next.get(running.name)!.state).toBe('completed');
  });

  test('a resumed session (queued again) is taken', () => {
    const ended = new Map([[running.name, session({ state: 'stopped' })]]);
    const next = reduceSessions(ended, {
      kind: 'session',
      session: running.name,
      state: 'queued',
      message: null,
      full: null
    });
    expect(next.get(running.name)!.state).toBe('queued');
  });

  test('an event for an unknown session changes nothing (the model refetches it)', () => {
    const next = reduceSessions(map, {
      kind: 'session',
      session: 'alice/mnist/9',
      state: 'running',
      message: null,
      full: null
    });
    expect([...next.keys()]).toEqual([running.name]);
  });
});

describe('filterSessions', () => {
  const list = [
    session({ name: 'alice/mnist/1', state: 'running', args: ['--lr', '0.1'] }),
    session({ name: 'alice/mnist/2', id: 2, state: 'completed', args: ['--lr', '0.01'] }),
    session({
      name: 'bob/cifar/1',
      id: 3,
      user: 'bob',
      team: 'vision',
      state: 'queued',
      datasets: ['cifar@1']
    })
  ];
  const names = (f: Partial<typeof DEFAULT_FILTER>) =>
    filterSessions(list, { ...DEFAULT_FILTER, ...f }, 'alice').map(s => s.name);

  test.each([
    ['everything by default', {}, ['alice/mnist/1', 'alice/mnist/2', 'bob/cifar/1']],
    ['active: queued, preparing, running', { state: 'active' }, ['alice/mnist/1', 'bob/cifar/1']],
    ['ended', { state: 'ended' }, ['alice/mnist/2']],
    ['one state', { state: 'queued' }, ['bob/cifar/1']],
    ['mine', { owner: 'mine' as const }, ['alice/mnist/1', 'alice/mnist/2']],
    ["my teams' (my teammates' sessions)", { owner: 'team' as const }, ['bob/cifar/1']],
    ['text in the team', { text: 'vision' }, ['bob/cifar/1']],
    ['text in the owner', { text: 'bob' }, ['bob/cifar/1']],
    ['text in the arguments', { text: '0.01' }, ['alice/mnist/2']],
    ['text in the name, any case', { text: 'CIFAR' }, ['bob/cifar/1']]
  ])('%s', (_, f, want) => {
    expect(names(f)).toEqual(want);
  });
});

describe('sortSessions', () => {
  const a = session({
    name: 'u/d/2',
    id: 2,
    created: '2026-01-01T00:00:02Z',
    state: 'completed',
    duration_s: 50,
    credits_used: 3
  });
  const b = session({
    name: 'u/d/10',
    id: 10,
    created: '2026-01-01T00:00:10Z',
    state: 'running',
    started: '2026-01-01T00:59:00Z',
    resources: { gpus: 4, gpu_models: [], cpu: 1, memory_mib: 1 }
  });
  const c = session({
    name: 'u/d/1',
    id: 1,
    created: '2026-01-01T00:00:01Z',
    state: 'queued',
    started: null,
    credits_used: 7,
    last_metrics: { loss: 0.5 }
  });
  const names = (ss: ISession[]) => ss.map(s => s.name);

  test.each([
    ['newest first', 'created', true, ['u/d/10', 'u/d/2', 'u/d/1']],
    ['names by session number, not as text', 'name', false, ['u/d/1', 'u/d/2', 'u/d/10']],
    ['state: running, then queued, then ended', 'state', false, ['u/d/10', 'u/d/1', 'u/d/2']],
    ['GPUs, most first', 'gpus', true, ['u/d/10', 'u/d/2', 'u/d/1']],
    ['credits, most first, unknown last', 'credits', true, ['u/d/1', 'u/d/2', 'u/d/10']],
    ['credits, least first, unknown still last', 'credits', false, ['u/d/2', 'u/d/1', 'u/d/10']]
  ] as const)('%s', (_, key, desc, want) => {
    expect(names(sortSessions([a, b, c], key, desc, NOW))).toEqual(want);
  });

  test('elapsed: an ended one by its duration, a running one up to now', () => {
    // a: 50 s; b: started 60 s before NOW; c: queued since 00:00:01 (3599 s)
    expect(names(sortSessions([a, b, c], 'elapsed', true, NOW))).toEqual([
      'u/d/1',
      'u/d/10',
      'u/d/2'
    ]);
  });

  test('by a metric: sessions without it last', () => {
    expect(names(sortSessions([a, b, c], 'metric', false, NOW, 'loss'))[0]).toBe('u/d/1');
  });
});

describe('sessionNotice', () => {
  const before = session();
  test.each([
    ['completed', { state: 'completed' }, 'success', 'alice/mnist/1 completed'],
    [
      'failed, with the reason',
      { state: 'failed', message: 'exit code 1' },
      'error',
      'alice/mnist/1 failed: exit code 1'
    ],
    ['OOM-killed', { state: 'oom_killed' }, 'error', 'alice/mnist/1 was killed: out of memory'],
    ['lost', { state: 'lost' }, 'error', 'alice/mnist/1 was lost'],
    ['stopped by me', { state: 'stopped', reason: 'stopped' }, 'info', 'alice/mnist/1 stopped'],
    [
      'stopped for credits',
      { state: 'stopped', reason: 'credits', message: 'no credits left' },
      'warning',
      'alice/mnist/1 was stopped: credits ran out: no credits left'
    ]
  ] as const)('%s', (_, over, level, message) => {
    expect(sessionNotice(before, session(over as Partial<ISession>), 'alice')).toEqual({
      level,
      message,
      session: 'alice/mnist/1'
    });
  });

  test.each([
    ['still running', undefined as ISession | undefined, session({ state: 'running' }), 'alice'],
    ['first seen already ended (a page load)', undefined, session({ state: 'failed' }), 'alice'],
    ['no change', session({ state: 'failed' }), session({ state: 'failed' }), 'alice'],
    ["someone else's", session(), session({ state: 'failed' }), 'bob']
  ])('nothing when %s', (_, b, a, me) => {
    expect(sessionNotice(b, a, me)).toBeNull();
  });
});

describe('credits', () => {
  test.each([
    ['charged so far', { credits_used: 1.25 }, 1.25],
    ['nothing charged yet', { credits_used: null }, null],
    ['a service without per-session credits', {}, null],
    ['zero is a figure', { credits_used: 0 }, 0]
  ])('credits_used: %s', (_, over, want) => {
    expect(sessionCredits(session(over))).toBe(want);
  });

  test.each([
    ['while running', { credit_rate: 2.5 }, 2.5],
    ['not once it ended', { credit_rate: 2.5, state: 'completed' as const }, null],
    ['not while queued', { credit_rate: 2.5, state: 'queued' as const }, null],
    ['not billed', { credit_rate: null }, null]
  ])('credit_rate: %s', (_, over, want) => {
    expect(sessionRate(session(over))).toBe(want);
  });

  test('the guessed names of an older sidebar are not read', () => {
    const old = { ...session(), credits: 9, credits_per_hour: 4 } as unknown as ISession;
    expect(sessionCredits(old)).toBeNull();
    expect(sessionRate(old)).toBeNull();
    const me = { name: 'alice', admin: false, credits: 10, groups: [], credits_per_hour: 4 };
    expect(burnRate(me, [])).toBeNull();
  });

  test('burn rate: the service figure, else the sum over my running sessions', () => {
    const me = { name: 'alice', admin: false, credits: 10, groups: [] };
    const ss = [
      session({ credit_rate: 2 }),
      session({ name: 'alice/mnist/2', credit_rate: 3 }),
      session({ name: 'alice/mnist/3', state: 'completed', credit_rate: 5 }),
      session({ name: 'bob/x/1', user: 'bob', credit_rate: 7 })
    ];
    expect(burnRate(me, ss)).toBe(5);
    expect(burnRate({ ...me, burn_rate: 1.5 }, ss)).toBe(1.5);
    expect(burnRate({ ...me, burn_rate: 0 }, ss)).toBe(0); // nothing of mine runs
    expect(burnRate(me, [session()])).toBeNull();
  });

  test.each([
    ['below the balance threshold', 5, null, true],
    ['lasting less than the hours', 50, 100, true],
    ['plenty, nothing running', 50, null, false],
    ['plenty at the rate', 500, 100, false]
  ])('low: %s', (_, balance, rate, want) => {
    expect(creditsLow(balance, rate, 10, 1)).toBe(want);
  });
});

describe('team sessions', () => {
  const me = { name: 'alice', admin: false, credits: 10, groups: ['vision'] };
  const mine = session();
  const teamMine = session({ name: 'alice/mnist/2', team: 'vision' });
  const theirs = session({ name: 'bob/mnist/1', user: 'bob', team: 'vision', visibility: 'team' });

  test.each([
    ['mine, no team: nothing', mine, null],
    ['mine, of a team: the team', teamMine, 'team vision'],
    ["a teammate's: owner and team", theirs, 'bob · team vision'],
    ['another user, no team (admin, public)', session({ user: 'carol', team: null }), 'carol']
  ])('owner label: %s', (_, s, want) => {
    expect(sessionOwnerLabel(s, 'alice')).toBe(want);
  });

  test.each([
    ['my running one: stop, not remove', mine, me, { stop: true, remove: false, submit: true }],
    [
      'my ended one: remove, not stop',
      session({ state: 'failed' }),
      me,
      { stop: false, remove: true, submit: true }
    ],
    [
      "a teammate's running one: no stop, remove or submit",
      theirs,
      me,
      { stop: false, remove: false, submit: false }
    ],
    [
      "a teammate's, as an admin: stop",
      theirs,
      { ...me, admin: true },
      { stop: true, remove: false, submit: true }
    ],
    [
      "a teammate's, as the team's admin: stop, not remove or submit",
      theirs,
      { ...me, team_admin_of: ['vision'] },
      { stop: true, remove: false, submit: false }
    ],
    [
      "a teammate's ended one, as the team's admin: nothing to stop",
      { ...theirs, state: 'completed' as const },
      { ...me, team_admin_of: ['vision'] },
      { stop: false, remove: false, submit: false }
    ],
    [
      "another team's, as an admin of mine: no stop",
      theirs,
      { ...me, team_admin_of: ['audio'] },
      { stop: false, remove: false, submit: false }
    ],
    ['caller not known yet: offered', theirs, null, { stop: true, remove: false, submit: true }]
  ])('actions: %s', (_, s, who, want) => {
    expect(sessionActions(s, who)).toEqual({ ...want, logs: true, fork: true });
  });

  test('the listing asks for my teams’ sessions too', async () => {
    const api = new FakeService();
    api.sessions.set(theirs.name, theirs);
    const model = new NSMLModel(api);
    await model.refreshSessions();
    expect(api.calls).toEqual([`GET ${SESSIONS_LISTING}`]);
    expect(SESSIONS_LISTING).toMatch(/[?&]teams=1(&|$)/);
    expect(model.sessions.get('bob/mnist/1')!.team).toBe('vision');
  });

  test("a teammate's session that fails raises no notice of mine", async () => {
    const api = new FakeService();
    api.sessions.set(theirs.name, theirs);
    const model = new NSMLModel(api);
    const notices: INotice[] = [];
    model.notice.connect((_, n) => notices.push(n));
    await model.refreshAll();
    api.sessions.set(theirs.name, { ...theirs, state: 'failed' });
    await model.refreshSessions();
    expect(model.sessions.get(theirs.name)!.state).toBe('failed');
    expect(notices).toEqual([]);
  });
});

test('gpuUseNow: mean of the reported GPUs', () => {
  expect(gpuUseNow(session({ gpu_use: [{ utilization_pct: 20 }, { utilization_pct: 60 }] }))).toBe(
    40
  );
  expect(gpuUseNow(session({ gpu_use: [{ utilization_pct: null }] }))).toBeNull();
});

test('progressFraction', () => {
  expect(progressFraction(5, 10)).toBe(0.5);
  expect(progressFraction(5, 0)).toBeNull();
  expect(progressFraction(20, 10)).toBe(1);
});

test('sessionPath encodes each part', () => {
  expect(sessionPath('a b/mnist/3')).toBe('a%20b/mnist/3');
});

/** A service in memory: the sessions it holds; records calls. */
class FakeService implements IApi {
  sessions = new Map<string, ISession>();
  me = { name: 'alice', admin: false, credits: 100, groups: [] as string[] };
  calls: string[] = [];
  async get<T>(path: string): Promise<T> {
    this.calls.push(`GET ${path}`);
    if (path.startsWith('sessions?')) {
      return { sessions: [...this.sessions.values()] } as T;
    }
    if (path.startsWith('sessions/')) {
      return this.sessions.get(decodeURIComponent(path.slice('sessions/'.length))) as T;
    }
    if (path === 'me') {
      return this.me as T;
    }
    if (path === 'datasets') {
      return { datasets: [] } as T;
    }
    if (path === 'submissions') {
      return { submissions: [] } as T;
    }
    throw new Error(`unexpected ${path}`);
  }
  async post<T>(path: string, body?: unknown): Promise<T> {
    this.calls.push(`POST ${path} ${JSON.stringify(body ?? null)}`);
    const name = path.replace(/^sessions\//, '').replace(/\/(stop|fork)$/, '');
    const s = this.sessions.get(name)!;
    if (path.endsWith('/stop')) {
      const stopped = { ...s, stop_requested: true };
      this.sessions.set(name, stopped);
      return stopped as T;
    }
    const child = {
      ...s,
      name: 'alice/mnist/9',
      id: 9,
      parent: name,
      args: (body as { args: string[] }).args,
      state: 'queued' as const
    };
    this.sessions.set(child.name, child);
    return child as T;
  }
  async del(path: string): Promise<void> {
    this.calls.push(`DELETE ${path}`);
  }
}

describe('NSMLModel', () => {
  test('a stream event updates the row and raises one notice; nothing on the first load', async () => {
    const api = new FakeService();
    api.sessions.set('alice/mnist/1', session());
    api.sessions.set('alice/mnist/2', session({ name: 'alice/mnist/2', id: 2, state: 'failed' }));
    const model = new NSMLModel(api, { now: () => NOW });
    const notices: INotice[] = [];
    model.notice.connect((_, n) => notices.push(n));
    await model.refreshAll();
    expect(model.sessions.size).toBe(2);
    expect(notices).toEqual([]); // the failed one was failed before we looked

    api.sessions.set('alice/mnist/1', session({ state: 'oom_killed', message: 'exit 137' }));
    await model.applyStreamEvent(
      classifyStreamEvent('message', { session: 'alice/mnist/1', state: 'oom_killed' })!
    );
    expect(model.sessions.get('alice/mnist/1')!.state).toBe('oom_killed');
    expect(notices.map(n => n.level)).toEqual(['error']);
    expect(notices[0].session).toBe('alice/mnist/1');
    expect(api.calls).toContain('GET sessions/alice/mnist/1');
  });

  test('a session started elsewhere that fails before the sidebar saw it still raises a notice, once', async () => {
    const api = new FakeService();
    const model = new NSMLModel(api);
    const notices: INotice[] = [];
    model.notice.connect((_, n) => notices.push(n));
    await model.refreshAll();
    api.sessions.set(
      'alice/mnist/5',
      session({ name: 'alice/mnist/5', state: 'failed', message: 'exit code 1' })
    );
    await model.applyStreamEvent(
      classifyStreamEvent('session', { session: 'alice/mnist/5', state: 'queued' })!
    );
    await model.applyStreamEvent(
      classifyStreamEvent('session', { session: 'alice/mnist/5', state: 'failed' })!
    );
    await model.refreshSessions();
    expect(notices).toEqual([
      { level: 'error', message: 'alice/mnist/5 failed: exit code 1', session: 'alice/mnist/5' }
    ]);
  });

  test('a session created after the first listing and first seen ended in a refresh raises a notice', async () => {
    const api = new FakeService();
    let now = Date.parse('2026-01-01T00:00:00Z');
    const model = new NSMLModel(api, { now: () => now });
    const notices: INotice[] = [];
    model.notice.connect((_, n) => notices.push(n));
    api.sessions.set(
      'alice/mnist/1',
      session({ state: 'failed', created: '2025-12-31T23:00:00Z' })
    );
    await model.refreshAll();
    now += 60_000;
    api.sessions.set(
      'alice/mnist/2',
      session({ name: 'alice/mnist/2', id: 2, state: 'failed', created: '2026-01-01T00:00:30Z' })
    );
    await model.refreshSessions();
    expect(notices.map(n => n.session)).toEqual(['alice/mnist/2']);
  });

  test('stop and fork go to the API and update the list', async () => {
    const api = new FakeService();
    api.sessions.set('alice/mnist/1', session());
    const model = new NSMLModel(api);
    await model.refreshSessions();
    await model.stop('alice/mnist/1');
    expect(model.sessions.get('alice/mnist/1')!.stop_requested).toBe(true);
    const child = await model.fork('alice/mnist/1', { args: ['--lr', '0.5'], checkpoint: 'e1' });
    expect(child.parent).toBe('alice/mnist/1');
    expect(model.sessions.get('alice/mnist/9')!.args).toEqual(['--lr', '0.5']);
    expect(api.calls).toContain(
      'POST sessions/alice/mnist/1/fork {"args":["--lr","0.5"],"checkpoint":"e1"}'
    );
  });

  test('low credits warn once until they recover', async () => {
    const api = new FakeService();
    api.me.credits = 3;
    const model = new NSMLModel(api);
    const notices: INotice[] = [];
    model.notice.connect((_, n) => notices.push(n));
    await model.refreshMe();
    await model.refreshSessions();
    await model.applyStreamEvent({ kind: 'credits', balance: 2 });
    expect(notices.filter(n => n.level === 'warning')).toHaveLength(1);
    expect(notices[0].message).toMatch(/credits are running low: 3\.00 left/);
  });

  test('an error of the service is shown, and cleared by the next success', async () => {
    const api = new FakeService();
    const model = new NSMLModel(api);
    const get = api.get.bind(api);
    api.get = async <T>(p: string): Promise<T> => {
      if (p === 'me') {
        throw new Error('service down (HTTP 502)');
      }
      return get<T>(p);
    };
    await model.refreshMe();
    expect(model.error).toBe('service down (HTTP 502)');
    api.get = get;
    await model.refreshMe();
    expect(model.error).toBeNull();
  });
});
